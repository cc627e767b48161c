"""A KV cache kept from one generation call to the next, for one conversation: each call
prefills only what its prompt adds to what the cache already holds.

    session = DecodeSession(params, config)
    generate(params, config, conversation_ids, session=session, ...)   # turn 1: the whole prompt
    generate(params, config, longer_ids, session=session, ...)         # turn 2: only the new tokens

A chat's prompt for turn n+1 is turn n's prompt, its answer and the new message, so
re-prefilling it costs O(conversation) model work a turn. The session remembers the token
ids in its cache's slots; a call keeps the longest prefix its prompt shares with them, cuts
the cache back there (`index`, and `valid` past it; the stale keys are masked and written
over), prefills the rest in one call and decodes as `generate_tokens` does (the same loop,
`decode.decode_loop`). vLLM's automatic prefix caching and llama.cpp's prompt cache work the
same way. A prompt that shares nothing (a `/reset`, the oldest turns left out) prefills whole.

Compiled programs: the new tokens are right-padded to a power of two (at least 16; the pad
slots are not valid and the next writes go over them) and the cache grows in powers of two
(at least 256 slots), so a growing conversation compiles a handful of programs, not one per
length. The cache holds `batch 1` only.

Sliding-window layers (Gemma 3's) keep every slot here too, not the ring of their last
`sliding_window` slots that `generate_tokens` keeps: cutting a ring back would need the slots
it has written over. Their window is in the mask (`kv_cache.is_ring`), and past the window
they hold more keys than a ring would (a long Gemma 3 conversation holds a global layer's cache
in each); a decode step reads only the window's slots (`kv_cache.window_keys`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import UserError
from jaxgpt.generation.decode import (check_fits, check_sampling_args, decode_loop, generate_tokens, picker,
                                      sampling_settings)
from jaxgpt.generation.stream import registered_sink
from jaxgpt.models import build_model
from jaxgpt.models.kv_cache import init_cache

MIN_CHUNK = 16  # the new tokens are padded to a power of two at least this
MIN_SLOTS = 256  # the cache's slots: a power of two at least this


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@functools.partial(jax.jit, donate_argnames=("cache",),
                   static_argnames=("config", "max_new_tokens", "greedy", "top_k", "use_top_p", "eos_id",
                                    "pad_id", "vocab_limit", "method", "stream", "use_penalty"))
def _extend_jit(params, cache, chunk, chunk_len, start, key, temperature, top_p, penalty, sink, seen, *, config,
                max_new_tokens, greedy, top_k, use_top_p, eos_id, pad_id, vocab_limit, method, stream, use_penalty):
    """Cut `cache` back to its first `start` slots, write `chunk [1, C]` (its first `chunk_len`
    tokens real, the rest padding) after them, decode. Slots are positions: the session's
    cache has no padding inside."""
    del use_penalty  # `seen` is None without the penalty
    model = build_model(config)
    slots = cache["valid"].shape[1]
    c = chunk.shape[1]
    cache = {**cache, "valid": cache["valid"] & (jnp.arange(slots) < start)[None], "index": start}
    real = jnp.arange(c) < chunk_len
    # Padding's positions repeat the last real one: never past the context (a learned position table).
    positions = jnp.minimum(start + jnp.arange(c), start + chunk_len - 1)[None]
    logits, cache = model.apply({"params": params}, chunk, positions=positions, attention_mask=real[None],
                                cache=cache, head_positions=(chunk_len - 1)[None, None])
    n_real = (start + chunk_len)[None]
    cache = {**cache, "index": n_real[0]}  # the padding's slots are written over by the decode steps
    pick = picker(temperature, top_p, penalty, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                  vocab_limit=vocab_limit, method=method)
    tokens, logprobs, cmask, cache = decode_loop(model, params, cache, logits[:, 0], n_real, key, pick, seen, sink,
                                                 max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                                 stream=stream)
    return {"tokens": tokens, "mask": cmask, "logprobs": logprobs,
            "lengths": jnp.sum(cmask, axis=1, dtype=jnp.int32)}, cache


@functools.partial(jax.jit, static_argnames=("slots",))  # no donation: the output is larger
def _grow(cache, slots: int):
    """The cache with `slots` slots, its contents kept at the front."""
    pad = lambda x: jnp.pad(x, [(0, 0), (0, slots - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    return {"layers": jax.tree.map(pad, cache["layers"]), "valid": pad(cache["valid"]), "index": cache["index"]}


class DecodeSession:
    """One conversation's KV cache (batch 1) across `generate` / `generate_tokens` calls.

    `generate_tokens(prompt_tokens [1, P], prompt_mask [1, P], key, ...)` takes and returns
    what `decode.generate_tokens` does (left padding is dropped) and also updates the cache.
    `reused`: how many of the last prompt's tokens came from the cache (0: prefilled whole).
    """

    def __init__(self, params, config):
        self.params, self.config = params, config
        self.cache = None  # the KV cache pytree, or None before the first call
        self.ids: list[int] = []  # the token ids the cache's first len(ids) slots hold
        self.reused = 0

    def reset(self) -> None:
        self.cache, self.ids, self.reused = None, [], 0

    def _slots(self, needed: int) -> int:
        slots = _pow2(needed, MIN_SLOTS)
        if slots > self.config.context_length:  # the context's end, and room for the last chunk's padding
            slots = max(self.config.context_length, -(-needed // MIN_CHUNK) * MIN_CHUNK)
        return slots

    def generate_tokens(self, prompt_tokens, prompt_mask, key, *, max_new_tokens: int, temperature=0.0,
                        top_k=None, top_p=None, eos_id=None, pad_id=None, vocab_limit=None, method="gumbel",
                        on_token=None, repetition_penalty=None) -> dict[str, Any]:
        tokens, mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
        if tokens.ndim != 2 or tokens.shape[0] != 1 or mask.shape != tokens.shape:
            raise ValueError(f"a DecodeSession decodes one prompt, [1, P]; got tokens {tokens.shape}, "
                             f"mask {mask.shape}")
        ids = tokens[0][mask[0]].tolist()
        if not ids:
            raise UserError("empty prompt; give at least one token of text")
        check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        check_fits(len(ids), max_new_tokens, self.config.context_length)
        traced, static = sampling_settings(temperature, top_k, top_p, eos_id, pad_id, vocab_limit, method,
                                           repetition_penalty)
        # the shared prefix, less the prompt's last token (its logits come from the prefill)
        kept = min(_shared_prefix(self.ids, ids), len(ids) - 1)
        chunk_len = len(ids) - kept
        width = _pow2(chunk_len, MIN_CHUNK)
        slots = self._slots(max(kept + width, len(ids) + max_new_tokens))
        if max_new_tokens == 0:  # nothing to decode: no cache to keep
            self.reset()
            return generate_tokens(self.params, self.config, tokens, mask, key, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                                   pad_id=pad_id, vocab_limit=vocab_limit, method=method, on_token=on_token,
                                   repetition_penalty=repetition_penalty)
        cache, self.cache, self.ids = self.cache, None, []  # donated below: unusable if the call fails
        if cache is None:  # every layer holds every slot: no rings (the module docstring)
            cache = init_cache(self.config, 1, slots)
        elif cache["valid"].shape[1] < slots:
            cache = _grow(cache, slots)
        chunk = np.zeros((1, width), np.int32)
        chunk[0, :chunk_len] = ids[kept:]
        seen = None
        if static["use_penalty"]:
            seen = np.zeros((1, self.config.vocab_size), bool)
            seen[0, ids] = True
        with registered_sink(on_token) as sink:
            out, cache = _extend_jit(self.params, cache, jnp.asarray(chunk), jnp.int32(chunk_len), jnp.int32(kept),
                                     key, sink=jnp.int32(sink), seen=seen, **traced, config=self.config,
                                     max_new_tokens=int(max_new_tokens), stream=on_token is not None, **static)
            out = jax.block_until_ready(out)
        written = int(cache["index"])
        self.cache, self.reused = cache, kept
        self.ids = (ids + np.asarray(out["tokens"])[0].tolist())[:written]
        return out


__all__ = ["DecodeSession"]
