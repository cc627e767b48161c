"""The KV cache: a plain pytree a decoding call takes and returns (`init_cache`), so decoding
is an ordinary pure function that `jit`, `lax.scan` and `lax.while_loop` can carry. It holds
`kv_heads` heads (grouped-query attention never repeats K/V per query head), heads-major, and
for sliding-window layers only the slots their window can reach (a ring).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Cache = dict[str, Any]


def init_cache(config, batch_size: int, max_len: int | None = None, windows=None) -> Cache:
    """An empty KV cache for `batch_size` rows and `max_len` slots (default: the context).

    `layers[i]["k"|"v"]`: `[batch * kv_heads, max_len, head_dim]` in the compute dtype, kv
    head by kv head (row `r * kv_heads + n` is row r's head n), so a decode step
    (`one_query_attention`) reads each head's keys and values where they lie (kept as
    `[batch, max_len, kv_heads, head_dim]`, XLA:CPU copied every layer's cache, transposed,
    at every step). `windows[i]` > 0 (a sliding-window layer, Gemma 3's): a ring of
    `min(window, max_len)` slots instead (`write_ring_cache`), as no query reads further back;
    `valid`: `[batch, max_len]` bool, True where a slot holds a real (non-padding) token;
    `index`: int32 scalar, the next slot to write (shared by all rows: prompts are
    left-padded so they end together).
    """
    max_len = max_len or config.context_length
    windows = windows or (0,) * config.n_layer
    dtype = jnp.dtype(config.dtype)  # the compute dtype

    def layer(window):
        shape = (batch_size * config.kv_heads, min(window, max_len) if window else max_len, config.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    return {
        "layers": tuple(layer(w) for w in windows),
        "valid": jnp.zeros((batch_size, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def write_cache(cache_layer, k, v, index):
    """Write this call's keys and values `[batch, seq, kv_heads, head_dim]` into a cache layer
    at slot `index`. Returns `(k, v, new_layer)`: the whole layer's keys and values as the
    attention kernels take them, `[batch, max_len, kv_heads, head_dim]`, are a transposed view
    of the cache; at a decode step `one_query_attention` transposes it back and XLA reads the
    cache itself, a prefill's kernel gets one copy."""
    b, t, kv, d = k.shape
    put = lambda c, x: jax.lax.dynamic_update_slice(  # noqa: E731
        c, jnp.swapaxes(x, 1, 2).reshape(b * kv, t, d).astype(c.dtype), (0, index, 0))
    new = {"k": put(cache_layer["k"], k), "v": put(cache_layer["v"], v)}
    view = lambda c: jnp.swapaxes(c.reshape(b, kv, -1, d), 1, 2)  # noqa: E731
    return view(new["k"]), view(new["v"]), new


def is_ring(cache_layer, window: int) -> bool:
    """Whether a layer's cache is a ring (`init_cache`'s `windows`): a sliding-window layer
    whose cache holds at most `window` slots. Given every slot instead (`init_cache` without
    `windows`, as a `DecodeSession` keeps them, to cut the cache back), it is written and read
    like a full layer's, its window in the mask (`layers.sliding_window_mask`). A ring of all
    the cache's slots (no more than the window) is both."""
    return bool(window) and cache_layer["k"].shape[1] <= window


def window_keys(k, v, mask, index, window: int):
    """A decode step's keys and values `[batch, len, kv_heads, head_dim]` and mask `[batch, 1, 1,
    len]` cut to the `window` slots that end at its own slot `index`, for a sliding-window layer
    whose cache holds every slot (`is_ring` False): the mask hides every slot outside them, so
    the step reads `window` slots, not `len` (a long `DecodeSession` chat's 1,024 against 128)."""
    start = jnp.clip(index - window + 1, 0, k.shape[1] - window)
    cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, window, axis)  # noqa: E731
    return cut(k, 1), cut(v, 1), cut(jnp.broadcast_to(mask, (*mask.shape[:3], k.shape[1])), 3)


def _ring_slots(start, ring_len: int, written: bool):
    """The slot each of a ring layer's `ring_len` entries holds, `[ring_len]` int (negative:
    none yet), before (`written=False`) or after a one-token write at slot `start`: entry j
    holds the latest slot congruent to j modulo `ring_len`."""
    last = start if written else start - 1
    return last - jnp.mod(last - jnp.arange(ring_len), ring_len)


def ring_window_mask(att, ring_len: int, window: int, seq: int):
    """The mask `[batch, 1, seq, keys]` of a sliding-window layer whose cache is a ring of
    `ring_len` slots (`init_cache(..., windows=)`), over the keys `write_ring_cache` returns:
    the ring after the write for one query (a decode step), else the ring before it followed
    by this call's `seq` keys. What `sliding_window_mask` lets a query see, where it lies in
    the ring: causal, within `window` slots, valid (not padding), and always itself."""
    start, q_slots, valid = att["start"], att["q_slots"], att["key_valid"]
    if seq == 1:
        k_slots = _ring_slots(start, ring_len, written=True)
    else:
        k_slots = jnp.concatenate([_ring_slots(start, ring_len, written=False), q_slots])
    held = jnp.take(valid, jnp.maximum(k_slots, 0), axis=1) & (k_slots >= 0)[None]  # [b, keys]
    near = (k_slots[None, :] <= q_slots[:, None]) & (q_slots[:, None] - k_slots[None, :] < window)  # [q, keys]
    mask = near[None, None] & held[:, None, None, :]
    return mask | (k_slots[None, :] == q_slots[:, None])[None, None]


def write_ring_cache(cache_layer, k, v, index):
    """`write_cache` for a sliding-window layer's ring of `ring_len` slots (slot s at entry
    s mod ring_len). One token (a decode step) overwrites the entry of the slot leaving the
    window and attends over the ring; longer calls (a prefill) attend over the ring before
    the write and their own keys, `[batch, ring_len + seq, kv_heads, head_dim]`, then keep
    their last `ring_len` slots. The keys' order is `ring_window_mask`'s."""
    b, t, kv, d = k.shape
    ring_len = cache_layer["k"].shape[1]
    heads_major = lambda x, c: jnp.swapaxes(x, 1, 2).reshape(b * kv, -1, d).astype(c.dtype)  # noqa: E731
    view = lambda c: jnp.swapaxes(c.reshape(b, kv, -1, d), 1, 2)  # noqa: E731
    if t == 1:
        put = lambda c, x: jax.lax.dynamic_update_slice(c, heads_major(x, c), (0, index % ring_len, 0))  # noqa: E731
        new = {"k": put(cache_layer["k"], k), "v": put(cache_layer["v"], v)}
        return view(new["k"]), view(new["v"]), new
    kept = min(t, ring_len)
    entries = jnp.mod(index + t - kept + jnp.arange(kept), ring_len)
    put = lambda c, x: c.at[:, entries].set(heads_major(x[:, t - kept:], c), unique_indices=True)  # noqa: E731
    new = {"k": put(cache_layer["k"], k), "v": put(cache_layer["v"], v)}
    cat = lambda c, x: jnp.concatenate([view(c), x.astype(c.dtype)], axis=1)  # noqa: E731
    return cat(cache_layer["k"], k), cat(cache_layer["v"], v), new


def repeat_rows(cache: Cache, times: int) -> Cache:
    """Each row of `cache` repeated `times` times in place (row r -> rows r*times .. r*times +
    times - 1), ring layers included: a prompt prefilled once, shared by a group of samples."""
    b = cache["valid"].shape[0]

    def rep(x):  # [b * kv_heads, slots, head_dim]: a row's heads are consecutive
        return jnp.repeat(x.reshape(b, -1, *x.shape[1:]), times, axis=0).reshape(-1, *x.shape[1:])

    return {"layers": jax.tree.map(rep, cache["layers"]), "valid": jnp.repeat(cache["valid"], times, axis=0),
            "index": cache["index"]}


__all__ = ["Cache", "init_cache", "is_ring", "repeat_rows", "ring_window_mask", "window_keys", "write_cache",
           "write_ring_cache"]
