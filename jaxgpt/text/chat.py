"""Chat templates: a model folder's jinja2 template rendered as transformers renders it.

    render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")

transformers' `apply_chat_template` compiles the template in jinja2's immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `raise_exception` global, a
`strftime_now` global and a `tojson` filter that does not escape HTML, and renders it with
`messages`, `add_generation_prompt` and the tokenizer's special tokens (`bos_token`,
`eos_token`, ...) plus any extra keyword (Qwen3's `enable_thinking`). This does the same, so
a prompt here is byte for byte the one transformers builds (`tests/test_chat.py`).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Sequence

from jaxgpt.errors import UserError


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
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


__all__ = ["render_chat"]
