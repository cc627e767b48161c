"""Chat templates: a model folder's jinja2 template rendered as transformers renders it.

    render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")

transformers' `apply_chat_template` compiles the template in jinja2's immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `raise_exception` global, a
`strftime_now` global and a `tojson` filter that does not escape HTML, and renders it with
`messages`, `add_generation_prompt` and the tokenizer's special tokens (`bos_token`,
`eos_token`, ...) plus any extra keyword (Qwen3's `enable_thinking`). This does the same, so
a prompt here is byte for byte the one transformers builds (`tests/test_chat.py`).

A template may mark what the assistant writes with `{% generation %}...{% endgeneration %}`
(transformers' `return_assistant_tokens_mask`); `render_chat_spans` returns those spans of the
text, which conversational fine-tuning scores (`jaxgpt.data.conversations`).
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
from datetime import datetime
from typing import Any, Sequence

from jaxgpt.errors import UserError


# While set, `{% generation %}` blocks render between these two characters (Unicode private use),
# which `render_chat_spans` turns into spans and takes out.
_MARKING = contextvars.ContextVar("jaxgpt_chat_marking", default=False)
OPEN, CLOSE = "\ue000", "\ue001"


def _generation_extension():
    import jinja2
    from jinja2.ext import Extension

    class Generation(Extension):
        """`{% generation %}body{% endgeneration %}`: the body, marked while `_MARKING` is set."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            body = caller()
            return f"{OPEN}{body}{CLOSE}" if _MARKING.get() else body

    return Generation


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def render_chat(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
                **special_tokens: Any) -> str:
    """The conversation `messages` (`{"role", "content"}` dicts) as `template` renders it;
    `special_tokens`: `bos_token`, `eos_token`, ... and template switches (`enable_thinking`)."""
    import jinja2

    try:
        return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the chat template failed: {e}") from None


def render_chat_spans(template: str, messages: Sequence[dict[str, Any]], **special_tokens: Any
                      ) -> tuple[str, list[tuple[int, int]] | None]:
    """`(text, spans)`: the conversation as `render_chat` renders it (no generation prompt) and
    the `(start, end)` character spans of its `{% generation %}` blocks, in order; spans is None
    when the template has none."""
    for m in messages:
        if OPEN in str(m.get("content")) or CLOSE in str(m.get("content")):
            raise UserError("a message holds the characters U+E000 / U+E001, which mark the assistant's text here")
    token = _MARKING.set(True)
    try:
        marked = render_chat(template, messages, **special_tokens)
    finally:
        _MARKING.reset(token)
    if OPEN not in marked:
        return marked, None
    text, spans, pos, start = [], [], 0, None
    for piece in re.split(f"([{OPEN}{CLOSE}])", marked):
        if piece == OPEN:
            start = pos
        elif piece == CLOSE:
            if start is not None:
                spans.append((start, pos))
            start = None
        else:
            text.append(piece)
            pos += len(piece)
    return "".join(text), [s for s in spans if s[1] > s[0]]


__all__ = ["render_chat", "render_chat_spans"]
