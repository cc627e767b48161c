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
