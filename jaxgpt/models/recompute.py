"""What the backward pass keeps: custom VJPs that save their inputs and recompute the rest.

- `LayerNorm` / `layer_norm` and `gelu_tanh`: GPT-2's normalisation and activation, equal
  to Flax's LayerNorm and `jax.nn.gelu(approximate=True)`, whose autodiff keeps several
  `[tokens, d]` intermediates per call (BENCHMARKS.md, "Peak training memory"); `RMSNorm` /
  `rms_norm` the same for Llama's, Qwen3's and Gemma 3's normalisation (transformers' arithmetic).
- `recompute_after_cotangent`: a whole block recomputed in the backward pass (`model.remat`).

`jax.checkpoint` protects its recomputation with optimisation barriers; XLA:CPU's pipeline
expands them and CSE then merges the recomputation back into the forward pass, so on CPU it
saves nothing. Here the recomputation's inputs are made to depend on the incoming cotangent
(`after_cotangent`), a data dependency that every backend keeps: what is recomputed cannot
be shared with the forward pass, nor computed before the backward pass reaches it.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def after_cotangent(tree, g):
    """`tree` (arrays), each made to depend on the cotangent `g` (`x + 0 * g[0]`, which XLA
    does not fold for floats), so what is computed from them is ordered after `g`: it cannot
    be CSE'd with the forward pass, nor scheduled early and held through it."""
    zero = jnp.zeros((), jnp.float32) * g.reshape(-1)[0].astype(jnp.float32)
    return jax.tree_util.tree_map(lambda x: x + zero.astype(x.dtype), tree)


def recompute_after_cotangent(fn):
    """`fn(params, x, *rest) -> y` with nothing saved for the backward pass but its inputs:
    the backward recomputes `fn` and differentiates it w.r.t. `params` and `x` (`rest`, e.g.
    masks and PRNG keys, get no gradient). `model.remat` runs each block through this."""

    # In the forward pass too, the params are made to depend on the block's input: else
    # XLA:CPU gathers (fsdp) and casts (bfloat16 weights) every block's params at the start
    # and holds them all through the forward pass (qwen3-8b, fsdp=8: 36 GiB per device).
    @jax.custom_vjp
    def wrapped(params, x, *rest):
        return fn(after_cotangent(params, x), x, *rest)

    def forward(params, x, *rest):
        return fn(after_cotangent(params, x), x, *rest), (params, x, rest)

    def backward(residuals, g):
        params, x, rest = residuals
        # params too: else XLA:CPU materialises the recomputation's bias broadcasts early
        # (they depend on params only) and holds all of them through the forward pass
        _, vjp = jax.vjp(lambda p, x: fn(p, x, *rest), *after_cotangent((params, x), g))
        return (*vjp(g), *(None for _ in rest))

    wrapped.defvjp(forward, backward)
    return wrapped


@jax.custom_vjp
def gelu_tanh(x):
    """GPT-2's GELU ("gelu_new", the tanh approximation), elementwise on `x [..., 4 * n_embd]`,
    equal to `jax.nn.gelu(x, approximate=True)`. Autodiff of that keeps its intermediates
    (the tanh, the cubic) for the backward pass: with 8 x 1024 tokens and n_embd 768 that is
    96 MiB per intermediate per layer. This keeps only `x`, which the MLP's backward holds
    anyway, and recomputes the derivative from it."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
    return jax.nn.gelu(x, approximate=True), x


def _gelu_tanh_bwd(x, g):
    x = after_cotangent(x, g)
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_SQRT_2_OVER_PI * (xf + _GELU_CUBIC * xf**3))
    # d/dx 0.5 x (1 + t) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 c x^2)
    dx = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * xf * xf)
    return ((g.astype(jnp.float32) * dx).astype(g.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def _layer_norm_stats(x, epsilon: float):
    """Float32 mean and 1 / std over the last axis, `[..., 1]` each (Flax's statistics: fast
    variance E[x^2] - E[x]^2, clipped at zero)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.maximum(0.0, (xf * xf).mean(-1, keepdims=True) - mean * mean)
    return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
    """LayerNorm over the last axis of `x [..., d]` with `scale`, `bias` `[d]` (float32
    result, computed as `flax.linen.LayerNorm` computes it). Autodiff of that keeps about
    four `[..., d]` float32 intermediates per call for the backward pass (2.3 GiB of gpt2-124m's
    8 x 1024 training step); this keeps `x` and the `[..., 1]` statistics, and recomputes the
    normalised values in the backward pass."""
    mean, rstd = _layer_norm_stats(x, epsilon)
    return (x - mean) * (rstd * scale) + bias


def _layer_norm_fwd(x, scale, bias, epsilon):
    mean, rstd = _layer_norm_stats(x, epsilon)
    return (x - mean) * (rstd * scale) + bias, (x, scale, bias, mean, rstd)


def _layer_norm_bwd(epsilon, residuals, g):
    x, scale, bias, mean, rstd = residuals
    # all four after g: else CSE shares the forward's broadcasts of scale and mean, which
    # XLA:CPU materialises and then holds through the whole forward pass
    x, scale, mean, rstd = after_cotangent((x, scale, mean, rstd), g)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    rows = tuple(range(g.ndim - 1))
    dxhat = g * scale
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return (dx.astype(x.dtype), (g * xhat).sum(rows).astype(scale.dtype), g.sum(rows).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """`flax.linen.LayerNorm` (the same `scale` / `bias` parameters, initialisers and values),
    through `layer_norm`, whose backward pass keeps only the input. Output in `dtype`."""

    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype or jnp.result_type(x, scale))


def _rms_norm_rstd(x, epsilon: float):
    """Float32 `1 / sqrt(mean(x^2) + eps)` over the last axis, `[..., 1]` (transformers' RMSNorm:
    the variance in float32 whatever x's dtype)."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x, scale, epsilon: float, unit_offset: bool = False):
    """RMSNorm over the last axis of `x [..., d]` with `scale [d]`, as transformers' Llama and
    Qwen3 compute it: normalised in float32, cast back to x's dtype, then times the scale.
    `unit_offset` (Gemma): times `1 + scale` (zeros at init) in float32, then cast.
    The backward pass keeps `x` and the `[..., 1]` statistic only (like `layer_norm`)."""
    return _rms_norm_fwd(x, scale, epsilon, unit_offset)[0]


def _rms_norm_fwd(x, scale, epsilon, unit_offset):
    rstd = _rms_norm_rstd(x, epsilon)
    xhat = x.astype(jnp.float32) * rstd
    y = (xhat * (1.0 + scale.astype(jnp.float32))).astype(x.dtype) if unit_offset else scale * xhat.astype(x.dtype)
    return y, (x, scale, rstd)


def _rms_norm_bwd(epsilon, unit_offset, residuals, g):
    x, scale, rstd = residuals
    x, scale, rstd = after_cotangent((x, scale, rstd), g)  # recomputed after g, not held (see layer_norm)
    xhat = x.astype(jnp.float32) * rstd
    g = g.astype(jnp.float32)
    gs = g * (1.0 + scale.astype(jnp.float32) if unit_offset else scale)
    dx = rstd * (gs - xhat * (gs * xhat).mean(-1, keepdims=True))
    return dx.astype(x.dtype), (g * xhat).sum(tuple(range(g.ndim - 1))).astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nn.Module):
    """RMSNorm with a `scale [d]` parameter, through `rms_norm`: ones at init, or with
    `unit_offset` (Gemma: the weight is `1 + scale`) zeros."""

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.epsilon, self.unit_offset).astype(self.dtype or x.dtype)
