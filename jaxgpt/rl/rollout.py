"""Rollouts: G sampled completions per prompt in one jitted call, and their log-probs.

Sampling is `jaxgpt.generation.decode.generate_tokens` (a fixed-size KV cache, one prefill call
of each prompt, its cache copied to the prompt's G rows (`group_size`), then a `lax.while_loop` that emits a token per step and stops once every row has emitted
`<|endoftext|>`, or the chat template's end of an answer; no Python loop over tokens). A rollout batch lays the left-padded prompt
and its completion side by side:

    tokens          [rows, P + N]  int32  left-padded prompt | completion (padding after eos)
    attention_mask  [rows, P + N]  bool   real prompt tokens and completion tokens
    completion_mask [rows, N]      bool   completion tokens, the eos included
    logprobs        [rows, N]      f32    log pi(token) under the sampling policy, untempered
    lengths         [rows]         int32  completion lengths

with rows = prompts x G, the G samples of prompt i in rows i*G .. i*G+G-1. Because the prompt
ends at the same column P in every row, the completion is always the last N columns, so
training recomputes log-probs by running the model over `[rows, P + N]` and applying the LM
head (`lm_logits`) only to the last N + 1 hidden states (`completion_logprobs`): the
head, 89% of a small GPT-2's FLOPs at vocab 50257, never sees the prompt. The reference model's log-probs come
from the same function with the reference params.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.train.losses import head_logprobs
from jaxgpt.models import lm_head_kernel


def encode_prompts(prompts: Sequence[str], tokenizer=None) -> list[list[int]]:
    """Token ids of each prompt text (`tokenizer`, default GPT-2's; special-token text allowed)."""
    from jaxgpt.text.tokenizer import gpt2_tokenizer

    tokenizer = tokenizer or gpt2_tokenizer()
    return [list(tokenizer.encode(p)) for p in prompts]


def pad_prompt_batch(prompts: Sequence[Sequence[int]], *, max_new_tokens: int, context_length: int,
                     length: int | None = None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to `[batch, length]` (int32 tokens, bool mask).

    length: the padded prompt length P (default: the longest prompt); a fixed P makes every
    rollout batch one compilation. UserError if a prompt is longer than P or P +
    max_new_tokens exceeds the context (no silent truncation)."""
    longest = max((len(p) for p in prompts), default=0)
    length = longest if length is None else length
    if longest > length:
        raise UserError(f"a prompt of {longest} tokens is longer than the prompt length {length}; "
                        "raise data.max_prompt_tokens")
    if length + max_new_tokens > context_length:
        raise UserError(f"prompts of {length} tokens plus {max_new_tokens} new tokens exceed the model's "
                        f"context of {context_length}; lower the rollout's max_new_tokens or shorten prompts")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, ids in enumerate(prompts):
        if len(ids) == 0:
            raise UserError("empty prompt")
        tokens[row, length - len(ids):] = ids
        mask[row, length - len(ids):] = True
    return tokens, mask


def rollout(params, config: ModelConfig, prompt_tokens, prompt_mask, key, *, group_size: int = 1,
            max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, eos_id: int | None = None, vocab_limit: int | None = None,
            method: str = "inverse_cdf") -> dict:
    """`group_size` completions of each prompt (see the module docstring for the outputs).

    prompt_tokens / prompt_mask: `[prompts, P]`, left-padded. key: this rollout's key (the
    caller folds in the step). temperature 0 is greedy. params: plain GPT params (LoRA
    adapters merged). method: the sampler's token draw (`generate_tokens`); the default
    inverse-CDF draw is exact and ~30x cheaper on CPU than a Gumbel variate per vocabulary
    entry, which would otherwise dominate a small model's rollout."""
    from jaxgpt.generation.decode import generate_tokens

    # each prompt is prefilled once for its group (`generate_tokens(group_size=)`)
    out = generate_tokens(params, config, prompt_tokens, prompt_mask, key, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                          vocab_limit=vocab_limit, method=method, group_size=group_size)
    prompt_tokens = jnp.repeat(jnp.asarray(prompt_tokens, jnp.int32), group_size, axis=0)
    prompt_mask = jnp.repeat(jnp.asarray(prompt_mask, bool), group_size, axis=0)
    return _assemble(prompt_tokens, prompt_mask, out["tokens"], out["mask"], out["logprobs"], out["lengths"])


@jax.jit
def _assemble(prompt_tokens, prompt_mask, tokens, mask, logprobs, lengths):
    return {
        "tokens": jnp.concatenate([prompt_tokens, tokens], axis=1),
        "attention_mask": jnp.concatenate([prompt_mask, mask], axis=1),
        "completion_mask": mask,
        "logprobs": logprobs,
        "lengths": lengths,
    }


def positions_of(attention_mask):
    """Positions `[b, t]` of a left-padded batch: real tokens count from 0 (as in sampling)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def completion_hidden(model, params, tokens, attention_mask, n: int):
    """Final hidden states `[b, n + 1, n_embd]` at the positions that predict the last n
    tokens (the prompt's last token, then completion tokens 0..n-1); dropout off."""
    hidden = model.apply({"params": params}, tokens, positions=positions_of(attention_mask),
                         attention_mask=attention_mask, return_hidden=True)
    return hidden[:, -(n + 1):]


def completion_logprobs(model, params, tokens, attention_mask, n: int, temperature: float = 1.0):
    """log pi(completion token | prefix) `[b, n]` float32 for rollout `tokens [b, P + n]`
    (0-masking of padding is the caller's, with `completion_mask`).

    `losses.head_logprobs` over the last n + 1 columns: the shared log-prob function, the
    LM head fused in (no `[b, n, vocab]` logits).
    temperature != 1 scores under the tempered policy softmax(logits / T), the policy that
    actually sampled the completions (the sampler's own log-probs are untempered)."""
    hidden = completion_hidden(model, params, tokens, attention_mask, n)
    return head_logprobs(hidden, lm_head_kernel(model.config, params), tokens[:, -(n + 1):], temperature=temperature)


def right_padded(tokens, attention_mask, pad_id: int = 0):
    """Left-padded rollout rows -> right-padded `(tokens [b, t], lengths [b])`: each row's
    real tokens (prompt + completion) moved to the front, `pad_id` after them. What the
    reward model reads (its score head sits at each row's last real token)."""
    mask = attention_mask.astype(bool)
    t = tokens.shape[1]
    pad_before = jnp.argmax(mask, axis=1)  # first real column (prompts are left-padded)
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    index = jnp.clip(pad_before[:, None] + jnp.arange(t)[None, :], 0, t - 1)
    moved = jnp.take_along_axis(tokens, index, axis=1)
    keep = jnp.arange(t)[None, :] < lengths[:, None]
    return jnp.where(keep, moved, pad_id).astype(jnp.int32), lengths


def completion_texts(out: dict, eos_id, tokenizer=None) -> list[str]:
    """Decoded completions of a rollout dict (its last N columns cut at `lengths`, a final id
    of `eos_id` (an id or a tuple of them: `Tokenizer.stop_ids`) dropped)."""
    from jaxgpt.generation.samplers import as_stop_ids
    from jaxgpt.text.tokenizer import gpt2_tokenizer

    dec = (tokenizer or gpt2_tokenizer()).decode
    n = out["completion_mask"].shape[1]
    tokens, lengths = np.asarray(out["tokens"])[:, -n:] if n else np.zeros((len(out["lengths"]), 0), int), np.asarray(out["lengths"])
    ends = as_stop_ids(eos_id) or ()
    texts = []
    for row, k in zip(tokens, lengths):
        ids = row[:k].tolist()
        if ids and ids[-1] in ends:
            ids = ids[:-1]
        texts.append(dec(ids))
    return texts


__all__ = ["completion_hidden", "completion_logprobs", "completion_texts", "encode_prompts", "pad_prompt_batch",
           "positions_of", "right_padded", "rollout"]
