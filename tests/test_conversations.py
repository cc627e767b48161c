"""Conversational SFT (`jaxgpt.data.conversations`): the assistant's turns are what transformers'
`return_assistant_tokens_mask` marks, with `{% generation %}` blocks in the template or
without them (found in the text); ShareGPT records, parquet, bad records; conversational
preference pairs; `finetune.py instruct` and `dpo` on conversations end to end."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jaxgpt.data.conversations import as_messages, encode_conversation, preference_pair
from jaxgpt.data.instruct import encode_split, make_batch
from jaxgpt.data.readers import pick_fields
from jaxgpt.errors import UserError
from jaxgpt.text.tokenizer import load_tokenizer
from tests.test_chat import chat_folder

transformers = pytest.importorskip("transformers")

# Templates whose {% generation %} blocks hold what the assistant writes, its turn's end included.
CHATML = ("{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
          "{% generation %}{{- m['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
          "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
          "{%- if m['role'] == 'assistant' %}{% generation %}{{- m['content'] | trim + '<|eot_id|>' }}"
          "{% endgeneration %}"
          "{%- else %}{{- m['content'] | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Gemma 3's layout: the system message joins the first user turn, the assistant is "model".
GEMMA3 = ("{{- bos_token }}"
          "{%- set sys = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' %}"
          "{%- for m in (messages[1:] if sys else messages) %}{%- if m['role'] == 'assistant' %}"
          "{{- '<start_of_turn>model\\n' }}{% generation %}{{- m['content'] | trim + '<end_of_turn>' }}"
          "{% endgeneration %}{{- '\\n' }}{%- else %}{{- '<start_of_turn>user\\n' + (sys if loop.first else '') + "
          "m['content'] | trim + '<end_of_turn>\\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}")
# Qwen3's (Qwen/Qwen3-0.6B, Apache-2.0; tools left out): an answer after the last user message
# gets a <think> block (empty without reasoning), an earlier one loses it. The generation block
# covers the turn from the <think> on, as the Qwen3 training templates of TRL and Marin do.
QWEN3 = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string %}
        {%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- generation %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}{{- content }}{%- endif %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma3": GEMMA3, "qwen3": QWEN3}
CONVERSATION = [{"role": "system", "content": "w9 w8"}, {"role": "user", "content": "w1 w2"},
                {"role": "assistant", "content": "<think> w5 </think> w3 w4"}, {"role": "user", "content": "w3 w4"},
                {"role": "assistant", "content": " w6 w7\n"}]


def unmarked(template: str) -> str:
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


def folder_with(tmp_path, template: str):
    from tokenizers import Tokenizer

    folder = chat_folder(tmp_path, template)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<start_of_turn>", "<end_of_turn>", "<think>", "</think>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def transformers_mask(folder, template: str, messages) -> tuple[list[int], list[int]]:
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|end|>",
                                                  bos_token="<|begin|>", pad_token="<|pad|>")
    out = theirs.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_turns_are_transformers_assistant_mask(tmp_path, name):
    """With the template's {% generation %} blocks, and with the same template without them
    (each answer found in the text, with a <think> block written before it and its turn's end
    token after it), the ids and the scored tokens are transformers' `input_ids` and
    `assistant_masks`."""
    template = TEMPLATES[name]
    want_ids, want_mask = transformers_mask(folder_with(tmp_path / "marked", template), template, CONVERSATION)
    # two answers of two words, each with its end token; the first with its reasoning (Qwen3: without
    # it, and the last one with an empty <think> block)
    assert sum(want_mask) == (8 if name == "qwen3" else 9)
    for t, sub in ((template, "marked"), (unmarked(template), "plain")):
        tok = load_tokenizer(str(folder_with(tmp_path / sub, t)))
        conv = encode_conversation(CONVERSATION, tok, "record 1")
        assert conv.ids.tolist() == want_ids and conv.scored.astype(int).tolist() == want_mask, sub
        assert conv.assistant == [2, 4] and len(conv.turns) == 2


def test_batches_score_the_answers_and_the_test_prompt_is_the_last_one(tmp_path):
    """A conversation's row scores exactly the assistant's tokens (targets shifted by one); its
    test prompt is the conversation before the last answer, as the chat command would ask it."""
    from jaxgpt.text.prompts import ChatFormat

    tok = load_tokenizer(str(folder_with(tmp_path, unmarked(CHATML))))
    records = [{"messages": CONVERSATION, "where": "r1"}, {"instruction": "w1", "input": "", "output": "w2"}]
    enc = encode_split(records, 64, tok)
    conv = encode_conversation(CONVERSATION, tok, "r1")
    batch = make_batch(enc, [0, 1], 2, 32, mask_prompt=True)
    n = len(conv.ids) - 1
    assert batch["mask"][0, :n].tolist() == conv.scored[1:].astype(float).tolist() and not batch["mask"][0, n:].any()
    assert batch["mask"][1].sum() == 2  # "w2" and the end of the answer
    # an instruction record is the one-turn conversation, ending where the template ends an answer
    # (<|im_end|>, not this tokenizer's eos <|end|>: Qwen3-Base's layout); decoding stops at either
    assert enc.seqs[1].tolist() == encode_conversation([{"role": "user", "content": "w1"},
                                                        {"role": "assistant", "content": "w2"}], tok, "r2").ids.tolist()
    assert enc.seqs[1][-1] == tok.answer_end_id == tok.special_tokens["<|im_end|>"] != tok.eos_id
    assert tok.stop_ids == (tok.eos_id, tok.answer_end_id)
    assert enc.records[0]["messages"] == CONVERSATION[:4] and enc.records[0]["output"] == "w6 w7"
    assert tok.decode(enc.prompts[0], skip_special=False) == tok.decode(
        tok.encode(ChatFormat(tok).conversation(CONVERSATION[:4])), skip_special=False)
    unmasked = make_batch(enc, [0], 1, 32, mask_prompt=False)
    assert unmasked["mask"][0, :n].all()
    short = encode_split(records[:1], 20, tok)  # the last answer starts past 20 tokens: the first one is asked
    assert short.records[0]["output"] == "<think> w5 </think> w3 w4" and len(short.seqs[0]) == 21


def test_an_earlier_answers_reasoning_left_out_by_the_template(tmp_path):
    """Qwen3's template writes an earlier answer without its <think> block: the answer's text
    after </think> is what is found and scored."""
    template = ("{%- for m in messages %}{%- set c = m['content'].split('</think>')[-1] if m['role'] == 'assistant' "
                "else m['content'] %}{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{%- endfor %}")
    tok = load_tokenizer(str(folder_with(tmp_path, template)))
    messages = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "<think>w2</think>w3"},
                {"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5"}]
    conv = encode_conversation(messages, tok, "r1")
    assert [tok.decode(conv.ids[a:b], skip_special=False) for a, b in conv.turns] == ["w3 <|im_end|>", "w5 <|im_end|>"]


def test_sharegpt_records_and_bad_conversations(tmp_path):
    sharegpt = [{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w2"}]
    assert as_messages(sharegpt, "r") == [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    for value, message in (([], "non-empty list"), ("w1", "non-empty list"), ([{"role": "user"}], "message 1 needs"),
                           ([{"role": "user", "content": "w1"}], "no assistant message")):
        with pytest.raises(UserError, match=message):
            as_messages(value, "r")
    with pytest.raises(UserError, match="tokenizer \\(gpt2\\) has no chat template"):
        encode_conversation(as_messages(sharegpt, "r"), load_tokenizer("gpt2"), "r")
    tok = load_tokenizer(str(folder_with(tmp_path, "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")))
    with pytest.raises(UserError, match="does not write assistant message 2 as it is.*generation"):
        encode_conversation(as_messages(sharegpt, "r"), tok, "r")
    # A record holding `messages` is read by it; one without needs instruction and output.
    instead = {"messages": "conversations"}
    row = pick_fields({"conversations": sharegpt}, "r", {"instruction": "instruction"}, {"input": "input"}, instead)
    assert row["messages"] == sharegpt and row["input"] == ""
    with pytest.raises(UserError, match="set data.instruction_field, or data.messages_field for messages"):
        pick_fields({"text": "w1"}, "r", {"instruction": "instruction"}, {}, instead)
    with pytest.raises(UserError, match="its field 'chat' is a conversation: set data.messages_field=chat"):
        pick_fields({"chat": sharegpt}, "r", {"instruction": "instruction"}, {}, instead)


def test_conversational_preference_pairs(tmp_path):
    """TRL's conversational pair layouts give the same prompt (the shared messages) and answers:
    UltraFeedback's (prompt text, chosen/rejected = [user, assistant]), an explicit prompt list
    with one-message answers, and answers alone after a prompt text; the prompt tokens are the
    chat template's with the generation prompt, each answer ends with the eos."""
    from jaxgpt.data.preference import encode_pairs
    from jaxgpt.text.prompts import ChatFormat

    user, good, bad = ({"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"},
                       {"role": "assistant", "content": "w4 w5"})
    want = {"messages": [user], "instruction": "w1 w2", "input": "", "chosen": "w3", "rejected": "w4 w5"}
    layouts = [{"instruction": "w1 w2", "chosen": [user, good], "rejected": [user, bad]},
               {"instruction": [user], "chosen": [good], "rejected": [bad]},
               {"instruction": "w1 w2", "input": "", "chosen": [good], "rejected": [bad]}]
    assert all(preference_pair(row, "r") == want for row in layouts)
    for row, message in (({"chosen": [good], "rejected": [bad]}, "has no prompt"),
                         ({"chosen": [user, good], "rejected": [bad]}, "must share every message"),
                         ({"chosen": [good, user], "rejected": [bad]}, "must end with the assistant's answer"),
                         ({"chosen": [user, good], "rejected": "w4"}, "both be texts or both conversations")):
        with pytest.raises(UserError, match=message):
            preference_pair(row, "r")
    tok = load_tokenizer(str(folder_with(tmp_path, unmarked(CHATML))))
    cols, truncated = encode_pairs([want], 32, "pairs", tok)
    prompt = tok.encode(ChatFormat(tok).conversation([user]))
    n = len(prompt)
    assert cols["prompt_lengths"][0] == n and truncated == 0
    assert cols["chosen"][0, :n + 2].tolist() == prompt + tok.encode("w3") + [tok.answer_end_id]
    assert cols["rejected_mask"][0].tolist() == [0] * n + [1] * 3 + [0] * (32 - n - 3)


def test_ppo_prompts_that_are_conversations(tmp_path):
    """A PPO prompt record whose prompt field is a list of messages (TRL's conversational
    prompts) is continued in the chat template; text records in the same file keep theirs;
    rollouts stop at the template's end of an answer."""
    from types import SimpleNamespace

    from jaxgpt.rl.prompt_sets import load_prompts
    from jaxgpt.text.prompts import ChatFormat

    tok = load_tokenizer(str(folder_with(tmp_path, unmarked(CHATML))))
    chat = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1 w2"}]
    rows = [{"prompt": chat}, {"prompt": "w3"}] * 3
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = SimpleNamespace(path=str(tmp_path / "prompts.jsonl"), instruction_field="prompt", input_field="input",
                           eval_size=2, seed=0, max_prompt_tokens=0)
    cfg = SimpleNamespace(data=data, rollout=SimpleNamespace(max_new_tokens=4),
                          model=SimpleNamespace(context_length=32))
    out = load_prompts(cfg, tok)
    fmt = ChatFormat(tok)
    want = {tuple(tok.encode(fmt.conversation(chat))), tuple(tok.encode(fmt.prompt("w3")))}
    tokens, mask, dropped = out["train"]
    got = {tuple(t[m.astype(bool)].tolist()) for t, m in zip(tokens, mask)}
    assert got == want and dropped == 0 and set(out["eval_text"]) <= {"w1 w2", "w3"}
    # rollouts of these prompts end at the template's end of an answer (<|im_end|>) as at the eos
    from jaxgpt.rl.common import token_kwargs

    ends = token_kwargs(tok, SimpleNamespace(vocab_size=tok.vocab_size))["eos_id"]
    assert ends == (tok.eos_id, tok.special_tokens["<|im_end|>"])


def test_finetune_on_conversations_from_parquet(tmp_path):
    """`finetune.py instruct --data chats.parquet` on a Qwen3 with a ChatML template: a parquet
    messages column (datasets' layout) trains every answer; responses.json holds each test
    conversation's messages, the reference answer and the model's."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from tests.test_families_cli import SHAPE, _main, _sets

    folder = folder_with(tmp_path, unmarked(CHATML))
    chats = [[{"role": "user", "content": f"w1 w{10 + i % 7}"}, {"role": "assistant", "content": f"w{10 + i % 7}"},
              {"role": "user", "content": "w2"}, {"role": "assistant", "content": f"w{20 + i % 5} w3"}]
             for i in range(20)]
    pq.write_table(pa.table({"messages": chats, "source": ["x"] * 20}), tmp_path / "chats.parquet")
    argv = ["instruct", "--data", tmp_path / "chats.parquet", "--out", tmp_path / "sft", *_sets(
        "model.family=qwen3", *SHAPE, "model.head_size=16", "model.vocab_size=320", f"model.tokenizer={folder}",
        "model.context_length=48", "train.epochs=1", "train.batch_size=4", "data.val_fraction=0.2",
        "data.test_fraction=0.2", "generate.max_new_tokens=3", "generate.batch_size=4")]
    assert _main("finetune", argv) == 0
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert np.isfinite(metrics["val_loss"]) and np.isfinite(metrics["test_loss"])
    rows = json.loads((tmp_path / "sft" / "responses.json").read_text())
    assert len(rows) == 4 and all(len(r["messages"]) == 3 and r["output"].endswith(" w3") for r in rows)
    # the template ends an answer with <|im_end|>, not the eos (<|end|>): answers end there too
    assert load_tokenizer(str(folder)).turn_end == "<|im_end|>"
    assert all("<|im_end|>" not in r["model_response"] for r in rows)
    # DPO from that run on conversational pairs (TRL's implicit-prompt layout, no prompt field)
    pairs = [{"chosen": chat[:1] + [{"role": "assistant", "content": chat[1]["content"]}],
              "rejected": chat[:1] + [{"role": "assistant", "content": "w2 w2"}]} for chat in chats]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    assert _main("finetune", ["dpo", "--init", tmp_path / "sft", "--data", tmp_path / "pairs.jsonl", "--out",
                              tmp_path / "dpo", *_sets("train.batch_size=4", "train.epochs=1", "data.val_fraction=0.2",
                                                       "data.test_fraction=0.2", "dpo.num_responses=1",
                                                       "dpo.max_new_tokens=3")]) == 0
    shown = json.loads((tmp_path / "dpo" / "responses.json").read_text())
    assert shown and all(len(r["messages"]) == 1 and r["chosen"].startswith("w1") for r in shown)
