"""Greedy answers to a whole set of token-id prompts, batched by length: what instruction and
preference tasks evaluate (`jaxgpt.tasks.instruct`, `jaxgpt.tasks.dpo`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.generation.decode import generate_tokens, pad_prompts


def greedy_responses(params, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], key, *,
                     max_new_tokens: int, batch_size: int, tokenizer=None) -> list[str]:
    """Greedy responses to token-id prompts, in order. Prompts are sorted by length and
    decoded `batch_size` at a time (left-padded, KV cache, stopping at the tokenizer's eos or,
    where that is another token, the chat template's end of an answer: `Tokenizer.stop_ids`);
    a batch gets `min(max_new_tokens, context - its longest prompt)` new tokens. `params` are
    plain (LoRA merged); `tokenizer` defaults to the model's. The last batch is filled with
    copies so every batch has one shape."""
    from jaxgpt.text.tokenizer import tokenizer_of

    tokenizer = tokenizer or tokenizer_of(model_cfg)
    ends = tokenizer.stop_ids
    out: list[str] = [""] * len(prompts)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [list(prompts[i]) for i in idx]
        new = min(max_new_tokens, model_cfg.context_length - max(len(r) for r in rows))
        if new < 1:
            raise UserError(f"a test prompt of {max(len(r) for r in rows)} tokens leaves no room to answer "
                            f"in the context of {model_cfg.context_length}")
        rows += [rows[0]] * (batch_size - len(rows))
        tokens, mask = pad_prompts(rows, max_new_tokens=new, context_length=model_cfg.context_length,
                                   pad_id=tokenizer.pad_id)
        limit = tokenizer.vocab_size if model_cfg.vocab_size > tokenizer.vocab_size else None
        res = generate_tokens(params, model_cfg, tokens, mask, key, max_new_tokens=new, temperature=0.0,
                              eos_id=ends, vocab_limit=limit)
        toks, lengths = np.asarray(res["tokens"]), np.asarray(res["lengths"])
        for row, i in enumerate(idx):
            ids = toks[row, :lengths[row]].tolist()
            if ids and ids[-1] in ends:
                ids = ids[:-1]
            out[i] = tokenizer.decode(ids).strip()
    return out
