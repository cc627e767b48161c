"""Chat templates (`jaxgpt.text.chat`, `jaxgpt.text.prompts.ChatFormat`) render as transformers'
`apply_chat_template` does, on a tokenizer folder and templates made here (offline): a
Qwen3-style ChatML template with its `<think>` switch, and a Llama 3-style one that writes the
begin-of-text token itself."""
from __future__ import annotations

import json

import pytest

from jaxgpt.errors import UserError
from jaxgpt.text.chat import render_chat
from jaxgpt.text.prompts import AlpacaFormat, ChatFormat, format_prompt, prompt_format
from jaxgpt.text.tokenizer import load_tokenizer
from tests.test_text import make_hf_tokenizer

transformers = pytest.importorskip("transformers")

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}\n"
    "{% for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{% endif %}\n"
)


def chat_folder(tmp_path, template: str, n_words: int = 300):
    folder = make_hf_tokenizer(tmp_path / "tok", n_words=n_words, chat_template=template)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("template, kwargs", [(CHATML, {}), (CHATML, {"enable_thinking": False}), (LLAMA3, {})])
def test_prompts_render_as_transformers_does(tmp_path, template, kwargs):
    folder = chat_folder(tmp_path, template)
    ours = load_tokenizer(str(folder))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|end|>",
                                                  bos_token="<|begin|>", pad_token="<|pad|>")
    theirs.chat_template = template
    fmt = ChatFormat(ours, **kwargs)
    for instruction, input in (("w1 w2", ""), ("w3", "w4 w5")):
        prompt = fmt.prompt(instruction, input)
        messages = fmt.messages(instruction, input)
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert prompt == want
        want_ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
        want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
        assert ours.encode(prompt) == list(want_ids)
    assert isinstance(prompt_format(ours), ChatFormat)


def test_without_a_template_the_format_is_alpaca():
    fmt = prompt_format(load_tokenizer("gpt2"))
    assert isinstance(fmt, AlpacaFormat) and fmt.prompt("Do it.", "x") == format_prompt("Do it.", "x")


def test_a_broken_template_is_a_one_line_error():
    with pytest.raises(UserError, match="does not parse"):
        render_chat("{% for %}", [])
    with pytest.raises(UserError, match="the chat template failed: no system"):
        render_chat("{{ raise_exception('no system') }}", [])
    assert json.loads(render_chat("{{ messages | tojson }}", [{"role": "user", "content": "<b>"}]))[0]["content"] == "<b>"


# Gemma 3's instruction-tuned template (text parts): the assistant is "model", a turn ends with
# <end_of_turn>, and the tokenizer's eos_token (<eos>) appears nowhere in it.
GEMMA3 = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}\n"
)


def _gemma_folder(tmp_path, ends: list[str] | None):
    from tokenizers import Tokenizer

    folder = chat_folder(tmp_path, GEMMA3)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])
    tok.save(str(folder / "tokenizer.json"))
    if ends is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(t) for t in ends]}))
    return folder


def test_a_gemma_style_turn_end_ends_responses(tmp_path):
    """A template that closes the assistant's turn with `<end_of_turn>` while eos_token is another
    token (Gemma's `-it` models): with generation_config.json listing both as ends, responses end
    with `<end_of_turn>` (SFT targets, where generation stops); without it, with eos_token. The
    prompt is transformers' own."""
    from jaxgpt.data.instruct import encode_split

    plain = load_tokenizer(str(_gemma_folder(tmp_path / "a", None)))
    folder = _gemma_folder(tmp_path / "b", ["<|end|>", "<end_of_turn>"])
    tok = load_tokenizer(str(folder))
    turn_end = tok._backend.token_to_id("<end_of_turn>")
    assert plain.eos_id == tok._backend.token_to_id("<|end|>") != turn_end and tok.eos_id == turn_end
    assert plain.turn_end == "<end_of_turn>" and tok.turn_end is None  # where chat-format answers stop too
    # generation ends at every end generation_config.json lists (as transformers' generate), chat answers
    # at the template's end of an answer too
    end = plain.eos_id
    assert tok.end_ids == tok.stop_ids == (turn_end, end) and plain.end_ids == (end,)
    assert plain.stop_ids == (end, turn_end)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|end|>",
                                                  bos_token="<|begin|>", pad_token="<|pad|>")
    theirs.chat_template = GEMMA3
    prompt = ChatFormat(tok).prompt("w1 w2")
    assert prompt == theirs.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False,
                                                add_generation_prompt=True)
    assert prompt == "<|begin|><start_of_turn>user\nw1 w2<end_of_turn>\n<start_of_turn>model\n"
    enc = encode_split([{"instruction": "w1 w2", "output": "w3"}], 64, tok)
    assert enc.seqs[0].tolist() == tok.encode(prompt) + tok.encode("w3") + [turn_end]
    # a run's copy of the tokenizer (and an export's) keeps generation_config.json, so its eos too
    from jaxgpt.config import Config, ModelConfig
    from jaxgpt.engine.rundir import RunDir

    (tmp_path / "run").mkdir()
    RunDir(tmp_path / "run", resume=False).keep_tokenizer(Config(model=ModelConfig(tokenizer=str(folder))))
    assert load_tokenizer(str(tmp_path / "run" / "tokenizer")).eos_id == turn_end
