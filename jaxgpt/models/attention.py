"""Attention kernels as pure functions, and the choice between them (`model.attention`).

Every kernel takes q `[batch, q_len, heads, head_dim]`, k/v `[batch, kv_len, kv_heads, head_dim]`
and returns `[batch, q_len, heads, head_dim]`; masks are bool, True = may attend. With fewer
key/value heads than query heads (grouped-query attention, `heads = kv_heads * group`), query
head `n` reads key/value head `n // group`, and no kernel repeats K/V per query head: the
reference groups the queries in its einsum, blockwise folds each group into its query rows,
`jax.nn.dot_product_attention` takes grouped K/V as they are.

* `reference_attention`: einsum + float32 softmax. Materialises the `[batch, heads, q_len,
  kv_len]` scores (and autodiff keeps them for the backward pass); the numerical reference.
* `one_query_attention`: the reference's math for a decode step, reading the KV cache in the
  heads-major layout it is kept in (no per-step transpose of the cache).
* `fused_attention`: `jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on NVIDIA
  GPUs). No dropout on the attention weights.
* `blockwise_attention`: flash-attention style online softmax over `[block_q, block_k]` tiles
  with a `jax.custom_vjp` whose backward recomputes each tile's scores from q, k, v, the output
  and the per-row logsumexp, so neither pass ever holds more than one tile of scores: the
  gradient costs O(batch * heads * q_len * head_dim) memory, not O(q_len * kv_len). Runs on
  any backend and honours attention dropout.
* `choose_attention`: what `model.attention` (including `auto`) runs for a given call.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.models.recompute import after_cotangent

BLOCK_Q = 128  # default tile sizes of `blockwise_attention` (read at call time)
BLOCK_K = 128
# `auto` on CPU takes `blockwise` from these key lengths on. Measured on a 2-core CPU (fwd+bwd,
# batch 8, 12 heads, head_dim 64, float32): causal (tiles above the diagonal skipped) is
# already faster at 256 keys (~130-220 ms vs ~220 ms) and 1.7-2.5x faster at 1024; with an
# explicit mask every tile is computed and blockwise only wins from 1024 (~2.4-2.9 s vs ~3.5 s;
# at 512 it is ~0.9 s vs ~0.75 s). Below 256 the einsum is as fast or faster. A padding mask
# over as many keys as queries is causal too, so the tiles above the diagonal are skipped
# there as well and the causal threshold holds (left-padded, 2026-12-06's AVX-512 AMD host:
# 124 vs 142 ms at 256 keys, 383 vs 378 at 512, 1.31 vs 1.42 s at 1024; 2.24 s without skipping).
AUTO_BLOCKWISE_MIN_KV_CAUSAL = 256
AUTO_BLOCKWISE_MIN_KV_MASKED = 1024

_MASKED = 0.5 * float(jnp.finfo(jnp.float32).min)  # masked by the caller (reference: finfo.min)
_PADDED = float(jnp.finfo(jnp.float32).min)  # keys added to fill the last block: below _MASKED


def reference_attention(q, k, v, mask, *, dropout_rate=0.0, dropout_rng=None):
    """Plain softmax attention, the numerical reference for the other kernels.

    q: `[batch, q_len, heads, head_dim]`, k/v: `[batch, kv_len, kv_heads, head_dim]` (kv_heads
    divides heads), mask: `[batch, 1, q_len, kv_len]` bool (True = may attend). Scores and
    softmax run in float32 whatever the input dtype. Returns `[batch, q_len, heads, head_dim]`.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    b, t, h, d = q.shape
    group = h // k.shape[2]
    if group > 1:  # [b, t, kv, group, d] against K/V of kv heads: the scores are [b, kv, group, t, s]
        q = q.reshape(b, t, k.shape[2], group, d)
        mask = mask[:, :, None]
    qk, pv = ("btkgd,bskd->bkgts", "bkgts,bskd->btkgd") if group > 1 else ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
    scores = jnp.einsum(qk, q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum(pv, weights.astype(v.dtype), v).reshape(b, t, h, d)


def one_query_attention(q, k, v, mask):
    """`reference_attention` for a decode step (one query, or a few) over a KV cache, written
    for the cache's heads-major layout (`jaxgpt.models.kv_cache.init_cache`).

    Shapes as `reference_attention`; k/v are the cache's `[batch, kv_len, kv_heads, head_dim]`
    view. Float32 scores and softmax, no dropout. Each (row, kv head)'s keys and values are
    read where they lie, as the matrix of a batched dot: scores `q K^T`, `[batch * kv_heads,
    t * group, kv_len]`, then output `p V`. The einsum form made XLA:CPU copy every layer's
    keys and values each step into `[heads, head_dim, kv_len]` (the minor-dimension transpose
    its batched matmul wanted; 24 copies per gpt2-124m token, ~3 ms of a ~23 ms step on an
    AVX-512 EPYC; `BENCHMARKS.md`, decode). The keys are the scores' minor axis, so the
    softmax reduces along rows: with the keys on a middle axis (`[.., kv_len, t * group]`),
    XLA:CPU's max over them took ~0.3 ms a layer at 1024 slots, as long as both dots.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    group = h // kv
    batch = ((0,), (0,))
    heads_major = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * kv, s, d)  # noqa: E731
    qt = q.reshape(b, t, kv, group, d).transpose(0, 2, 1, 3, 4).reshape(b * kv, t * group, d)
    scores = lax.dot_general(qt, heads_major(k), (((2,), (2,)), batch),
                             preferred_element_type=jnp.float32) * scale  # [b * kv, t * group, s]
    keep = jnp.broadcast_to(mask[:, :, :, None], (b, kv, t, group, s))
    scores = jnp.where(keep.reshape(b * kv, t * group, s), scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = lax.dot_general(weights, heads_major(v), (((2,), (1,)), batch))  # [b * kv, t * group, d]
    return out.reshape(b, kv, t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def fused_attention(q, k, v, mask, *, implementation: str | None, is_causal: bool, window: int = 0):
    """`jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on NVIDIA GPUs).

    Shapes as `reference_attention` (grouped K/V are taken as they are). With `is_causal` the
    mask is implied and not materialised, which the cuDNN kernel needs; `window` > 0 (with
    `is_causal`) narrows it to the `window` latest keys, the query's own included.
    """
    impl = None if implementation == "xla" else implementation
    if is_causal:
        local = (window - 1, 0) if window else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation=impl)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


class _Spec(NamedTuple):
    """The static side of one `blockwise_attention` call (hashable: a `custom_vjp` nondiff arg)."""

    block_q: int
    block_k: int
    kv_len: int  # real keys; slots from here on are padding
    causal: bool  # key index <= query index (top-left aligned, as jax.nn.dot_product_attention)
    rate: float  # attention dropout probability (0: none)
    scale: float
    group: int = 1  # query rows per position (grouped-query attention folds a group into the rows)
    window: int = 0  # causal only: also key index > query index - window (sliding-window attention)


def _keep(spec: _Spec, rng, i, j, shape):
    """Dropout keep mask `[batch, heads, block_q, block_k]` of tile (i, j): a function of the
    key and the tile indices only, so the backward pass regenerates the forward's mask."""
    key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
    return jax.random.bernoulli(key, 1.0 - spec.rate, shape)


def _tile_scores(spec: _Spec, qi, k, mask, i, j):
    """Scaled, masked float32 scores `[batch, heads, block_q, block_k]` of tile (i, j) and the
    bool `[.., block_q, block_k]` where they are real. qi: `[batch, block_q, heads, head_dim]`."""
    bq, bk = spec.block_q, spec.block_k
    kj = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
    s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.float32) * spec.scale
    k_idx = j * bk + jnp.arange(bk)
    ok = jnp.ones((bq, bk), bool)
    if spec.causal:  # a folded row's position is its index // group
        q_pos = ((i * bq + jnp.arange(bq)) // spec.group)[:, None]
        ok = k_idx[None, :] <= q_pos
        if spec.window:
            ok = ok & (k_idx[None, :] > q_pos - spec.window)
    if mask is not None:  # [batch | 1, 1 | heads, Tq, Tk], padded with False
        ok = ok & lax.dynamic_slice(mask, (0, 0, i * bq, j * bk), mask.shape[:2] + (bq, bk))
    s = jnp.where(ok, s, _MASKED)
    s = jnp.where(k_idx < spec.kv_len, s, _PADDED)  # never attended, even by fully masked rows
    return s, ok


def _k_range(spec: _Spec, i, nk):
    """Key tiles that query tile i needs: causal attention skips the tiles above the diagonal,
    a sliding window also those before its first query's window."""
    if not spec.causal:
        return 0, nk
    last = (i * spec.block_q + spec.block_q - 1) // spec.group  # the tile's last query position
    first = 0
    if spec.window:
        first = jnp.maximum(0, (i * spec.block_q) // spec.group - spec.window + 1) // spec.block_k
    return first, jnp.minimum(nk, last // spec.block_k + 1)


def _q_range(spec: _Spec, j, nq):
    """Query tiles that key tile j contributes to (the transpose of `_k_range`)."""
    if not spec.causal:
        return 0, nq
    end = nq
    if spec.window:  # the last position whose window reaches the tile's last key, as its last row
        last_row = (j * spec.block_k + spec.block_k - 1 + spec.window) * spec.group - 1
        end = jnp.minimum(nq, last_row // spec.block_q + 1)
    return (j * spec.block_k * spec.group) // spec.block_q, end


def _flash_fwd_core(spec: _Spec, q, k, v, mask, rng):
    """Padded inputs -> output `[b, Tq, h, d]` (q's dtype) and the row max and log row sum
    `[b, h, Tq]` (f32; kept apart, as their sum loses log(l) next to a masked row's huge max)."""
    b, tq, h, d = q.shape
    bq, nq, nk = spec.block_q, tq // spec.block_q, k.shape[1] // spec.block_k

    def q_tile(i, carry):
        out, row_max, log_sum = carry
        qi = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)

        def k_tile(j, c):
            m, l, acc = c
            s, _ = _tile_scores(spec, qi, k, mask, i, j)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * alpha + p.sum(-1)  # normalised before dropout, as softmax-then-dropout
            if spec.rate > 0.0:
                p = jnp.where(_keep(spec, rng, i, j, p.shape), p / (1.0 - spec.rate), 0.0)
            vj = lax.dynamic_slice_in_dim(v, j * spec.block_k, spec.block_k, axis=1)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, l, acc * alpha[..., None] + pv

        init = (jnp.full((b, h, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, h, bq, d), jnp.float32))
        m, l, acc = lax.fori_loop(*_k_range(spec, i, nk), k_tile, init)
        o = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(out.dtype)  # l >= 1: the row max
        out = lax.dynamic_update_slice_in_dim(out, o, i * bq, axis=1)
        row_max = lax.dynamic_update_slice_in_dim(row_max, m, i * bq, axis=2)
        return out, row_max, lax.dynamic_update_slice_in_dim(log_sum, jnp.log(l), i * bq, axis=2)

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, h, tq), jnp.float32), jnp.zeros((b, h, tq), jnp.float32))
    return lax.fori_loop(0, nq, q_tile, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: _Spec, q, k, v, mask, rng):
    return _flash_fwd_core(spec, q, k, v, mask, rng)[0]


def _flash_fwd(spec, q, k, v, mask, rng):
    out, row_max, log_sum = _flash_fwd_core(spec, q, k, v, mask, rng)
    return out, (q, k, v, mask, rng, out, row_max, log_sum)


def _flash_bwd(spec, res, g):
    """The flash-attention backward: for each key tile, loop over the query tiles that see it,
    recompute p = exp(s - max - log sum) (and the same dropout mask), and accumulate dq, dk, dv.
    Uses D = rowsum(dO * O) = rowsum(p * dp), which holds with dropout too."""
    q, k, v, mask, rng, out, row_max, log_sum = res
    b, tq, h, d = q.shape
    bq, bk = spec.block_q, spec.block_k
    nq, nk = tq // bq, k.shape[1] // bk
    delta = jnp.einsum("bqhd,bqhd->bhq", g.astype(jnp.float32), out.astype(jnp.float32))

    def k_tile(j, carry):
        dq, dk, dv = carry
        kj = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        vj = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)

        def q_tile(i, c):
            dq, dkj, dvj = c
            qi = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
            gi = lax.dynamic_slice_in_dim(g, i * bq, bq, axis=1)
            s, ok = _tile_scores(spec, qi, k, mask, i, j)
            rows = lambda x: lax.dynamic_slice_in_dim(x, i * bq, bq, axis=2)[..., None]
            p = jnp.exp((s - rows(row_max)) - rows(log_sum))
            dp = jnp.einsum("bqhd,bkhd->bhqk", gi, vj, preferred_element_type=jnp.float32)
            pd = p
            if spec.rate > 0.0:
                keep = _keep(spec, rng, i, j, p.shape)
                pd = jnp.where(keep, p / (1.0 - spec.rate), 0.0)
                dp = jnp.where(keep, dp / (1.0 - spec.rate), 0.0)
            dvj = dvj + jnp.einsum("bhqk,bqhd->bkhd", pd.astype(g.dtype), gi, preferred_element_type=jnp.float32)
            ds = jnp.where(ok, p * (dp - rows(delta)), 0.0) * spec.scale
            ds = ds.astype(q.dtype)
            dqi = jnp.einsum("bhqk,bkhd->bqhd", ds, kj, preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dqi, i * bq, axis=1)
            dkj = dkj + jnp.einsum("bhqk,bqhd->bkhd", ds, qi, preferred_element_type=jnp.float32)
            return dq, dkj, dvj

        zeros = jnp.zeros((b, bk, h, d), jnp.float32)
        dq, dkj, dvj = lax.fori_loop(*_q_range(spec, j, nq), q_tile, (dq, zeros, zeros))
        dk = lax.dynamic_update_slice_in_dim(dk, dkj, j * bk, axis=1)
        return dq, dk, lax.dynamic_update_slice_in_dim(dv, dvj, j * bk, axis=1)

    # zeros made after g: else XLA:CPU schedules these constant buffers early and holds them
    # through the whole forward pass (3 x [b, T, h, d] per layer)
    init = after_cotangent(tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v)), g)
    dq, dk, dv = lax.fori_loop(0, nk, k_tile, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tiles(length: int, block: int | None, default: int) -> tuple[int, int]:
    """(tile size, padded length): a length under one tile is one tile of exactly that length."""
    block = min(block or default, length)
    return block, -(-length // block) * block


def blockwise_attention(q, k, v, mask=None, *, is_causal=False, block_q=None, block_k=None,
                        dropout_rate=0.0, dropout_rng=None, window: int = 0):
    """Softmax attention in `[block_q, block_k]` tiles with an online softmax (flash attention).

    q: `[batch, q_len, heads, head_dim]`, k/v: `[batch, kv_len, kv_heads, head_dim]`. Returns
    `[batch, q_len, heads, head_dim]` in q's dtype; equal to `reference_attention` with the
    same mask up to float rounding (scores, softmax and accumulators are float32).

    mask: optional bool `[batch | 1, 1 | heads, q_len, kv_len]` (True = may attend), sliced per
    tile (it is an input, so it is held: 1 byte per entry, shared by the heads, vs the 4 bytes
    per entry per head the reference's scores take). is_causal: key index <= query index,
    generated per tile from indices (no mask array), and key tiles above the diagonal are
    skipped; both may be given. window > 0 (with is_causal): each query sees only the `window`
    latest keys, itself included (sliding-window attention), generated per tile too, and key
    tiles wholly before a query tile's windows are skipped (work O(T * window), not O(T^2)). A
    row with every key masked gets the reference's answer (the mean of v).

    Lengths need not be multiples of the tiles: inputs are padded and the padded keys masked.
    Tile sizes default to `BLOCK_Q` / `BLOCK_K` (a length shorter than a tile is one tile).

    dropout_rate > 0 with a dropout_rng drops attention weights as `reference_attention` does
    (after the softmax, survivors scaled by 1 / (1 - rate)), with a keep mask per tile drawn
    from `fold_in(fold_in(dropout_rng, i), j)`: deterministic for a key, regenerated exactly
    by the backward pass, but a different draw than the reference's (and than other tile sizes).
    """
    b, t, h, d = q.shape
    kv_len, group = k.shape[1], h // k.shape[2]
    if group > 1:  # fold each group into the rows: [b, t * group, kv_heads, d], row r at position r // group
        q = q.reshape(b, t, k.shape[2], group, d).transpose(0, 1, 3, 2, 4).reshape(b, t * group, k.shape[2], d)
        if mask is not None:
            mask = jnp.repeat(jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (1, 1, t, kv_len))), group, axis=2)
    q_len = q.shape[1]
    bq, tq = _tiles(q_len, block_q, BLOCK_Q)
    bk, tk = _tiles(kv_len, block_k, BLOCK_K)
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    if window and not is_causal:
        raise ValueError("blockwise_attention: window needs is_causal (else give the window in the mask)")
    spec = _Spec(bq, bk, kv_len, bool(is_causal), rate, 1.0 / math.sqrt(d), group, int(window))
    pad = lambda x, t: jnp.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0), (0, 0)))
    if mask is not None:
        mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (1, 1, q_len, kv_len))).astype(bool)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, tq - q_len), (0, tk - kv_len)))
    out = _flash(spec, pad(q, tq), pad(k, tk), pad(v, tk), mask, dropout_rng if rate > 0.0 else None)[:, :q_len]
    if group > 1:
        out = out.reshape(b, t, group, k.shape[2], d).transpose(0, 1, 3, 2, 4).reshape(b, t, h, d)
    return out


def dropout_keep_mask(dropout_rng, shape, *, dropout_rate, block_q=None, block_k=None):
    """The whole keep mask `[batch, heads, q_len, kv_len]` that `blockwise_attention` draws tile
    by tile (same tiles, same keys); it materialises the scores' shape, so for tests only."""
    b, h, q_len, kv_len = shape
    bq, tq = _tiles(q_len, block_q, BLOCK_Q)
    bk, tk = _tiles(kv_len, block_k, BLOCK_K)
    spec = _Spec(bq, bk, kv_len, False, float(dropout_rate), 1.0)
    rows = [jnp.concatenate([_keep(spec, dropout_rng, i, j, (b, h, bq, bk)) for j in range(tk // bk)], -1)
            for i in range(tq // bq)]
    return jnp.concatenate(rows, -2)[:, :, :q_len, :kv_len]


def _is_nvidia_gpu() -> bool:
    if jax.default_backend() != "gpu":
        return False
    device = jax.devices()[0]
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    return "cuda" in version or "nvidia" in str(device.device_kind).lower()


def choose_attention(kind: str, *, dtype, dropout: float, kv_len: int, is_causal: bool,
                     head_dim: int = 64, q_len: int = 0, causal_mask: bool = False) -> str:
    """The kernel `model.attention=kind` runs for one call: reference | xla | cudnn | blockwise
    | one_query.

    dropout: this call's attention dropout (0 when deterministic); kv_len: keys per query;
    is_causal: the mask is the plain causal one (no padding, no cache); q_len: queries;
    causal_mask: the explicit mask hides every key after its query too (a padding mask without
    a cache), so blockwise skips the same tiles as for `is_causal`.
    `reference` and `auto`: a single query (a decode step) runs `one_query`, the reference's
    math written for the KV cache's layout.
    `auto`: cuDNN flash attention on an NVIDIA GPU for bf16/fp16 without dropout, causal (the
    mask cuDNN takes without reading one; padding and cache masks go to XLA) and a head_dim
    cuDNN supports (a multiple of 8, at most 128); otherwise,
    on a GPU/TPU, XLA's fused attention without dropout and `blockwise` with it (the fused
    kernels have no attention dropout); on CPU, `blockwise` from `AUTO_BLOCKWISE_MIN_KV_CAUSAL`
    (causal, `causal_mask` too) or `AUTO_BLOCKWISE_MIN_KV_MASKED` (another explicit mask) keys,
    where it is faster and its memory O(T) not O(T^2), else `reference`.
    Explicit `xla` / `cudnn` with dropout > 0 run `reference`, so dropout is still applied.
    """
    if kind in ("reference", "auto") and q_len == 1 and dropout == 0.0:
        return "one_query"
    if kind == "auto":
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        cudnn_shape = is_causal and head_dim % 8 == 0 and head_dim <= 128
        if dropout == 0.0 and half and cudnn_shape and _is_nvidia_gpu():
            return "cudnn"
        if jax.default_backend() != "cpu":
            return "xla" if dropout == 0.0 else "blockwise"
        threshold = AUTO_BLOCKWISE_MIN_KV_CAUSAL if is_causal or causal_mask else AUTO_BLOCKWISE_MIN_KV_MASKED
        return "blockwise" if kv_len >= threshold else "reference"
    if kind in ("xla", "cudnn") and dropout > 0.0:
        return "reference"
    return kind
