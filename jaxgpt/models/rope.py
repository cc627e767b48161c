"""Rotary position embeddings as transformers computes them for Llama 3, Qwen3 and Gemma 3.

The "rotate half" layout: a head's dimension `d` pairs entry `i` with entry `i + d/2` (Hugging
Face's checkpoints have q and k permuted into it; Meta's original interleaves pairs):

    inv_freq[j] = 1 / theta^(2j / d)                   j < d/2, float32 (`rope_frequencies`)
    angle[b, t, j] = positions[b, t] * inv_freq[j]
    cos, sin = cos(angle), sin(angle), each repeated twice along j: [b, t, d]   (`rope_tables`)
    rotate(x) = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1]

`model.rope_scaling.type: linear` (Gemma 3's global layers from 4B up) divides inv_freq by
`factor`; `llama3` (Llama 3.1 / 3.2) rescales inv_freq by wavelength:
wavelengths longer than `original_context / low_freq_factor` are divided by `factor`, shorter
than `original_context / high_freq_factor` kept, and the band between interpolated (transformers'
`_compute_llama3_parameters`, in float32 as there).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def rope_frequencies(config, theta: float | None = None, scaled: bool = True) -> np.ndarray:
    """`inv_freq [head_dim / 2]` float32 of a `ModelConfig` (`rope_theta`, `rope_scaling`).
    `theta` replaces `rope_theta` and `scaled=False` leaves out the scaling: Gemma 3's
    sliding-window layers (`rope_local_theta`, never scaled)."""
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    base = np.float32(config.rope_theta if theta is None else theta)
    inv_freq = (np.float32(1.0) / (base ** exponent)).astype(np.float32)
    r = config.rope_scaling
    if not scaled:
        return inv_freq
    if r.type == "linear":
        return (inv_freq / np.float32(r.factor)).astype(np.float32)
    if r.type == "llama3":
        low_wavelen = r.original_context / r.low_freq_factor
        high_wavelen = r.original_context / r.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(r.factor), inv_freq).astype(np.float32)
        smooth = ((r.original_context / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor))
        smooth = smooth.astype(np.float32)
        smoothed = (1 - smooth) * scaled / np.float32(r.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(config, positions, theta: float | None = None, scaled: bool = True):
    """`(cos, sin)`, each `[batch, seq, head_dim]` float32, for `positions [batch, seq]` int
    (`theta`, `scaled`: as `rope_frequencies`)."""
    inv_freq = jnp.asarray(rope_frequencies(config, theta, scaled))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, rope):
    """`x [batch, seq, heads, head_dim]` rotated by `rope` (`rope_tables`), in x's dtype."""
    cos, sin = (t[:, :, None, :].astype(x.dtype) for t in rope)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
