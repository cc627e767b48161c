"""LoRA: low-rank adapters on the model's dense layers (Hu et al. 2021; Raschka appendix E).

A targeted dense layer keeps its kernel `W [in, out]` and bias, and gains two leaves:

    lora_a [in, r]   random, uniform(+-1/sqrt(in)) (PyTorch's kaiming_uniform(a=sqrt(5)), as the book)
    lora_b [r, out]  zeros, so a fresh adapter changes nothing
    y = x @ W + b + (x @ lora_a) @ lora_b * alpha / r

Which leaves train is decided elsewhere, by a label tree (`jaxgpt.train.optim`): LoRA training
labels only `lora_a`/`lora_b` as trainable (`is_lora_leaf`). `merge_lora` folds the adapters
into the kernels and returns plain params that the plain model (no `lora`) runs.

Targets name dense modules by the end of their path: `c_fc` matches every `h_i/mlp/c_fc`,
`attn/c_proj` only the attention output projection, `h_11/mlp/c_proj` one layer; `all` (the
default) matches every dense layer a block has, plus a classifier's `score` head (never the
LM head): GPT-2's c_attn, c_proj, c_fc; Llama's, Qwen3's and Gemma 3's q, k, v, o, gate, up, down. With
`split_qkv`, the fused qkv projection `c_attn` gets three rank-r adapters (q, k, v adapted
separately, as appendix E's separate `W_query`/`W_key`/`W_value` layers); they are stacked on
a leading axis: `lora_a [3, in, r]`, `lora_b [3, r, out/3]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import UserError

LORA_LEAVES = ("lora_a", "lora_b")
ALL = "all"  # every dense layer built with adapters: each block's projections and a task's score head
DEFAULT_TARGETS = (ALL,)


@dataclass(frozen=True)
class LoRAConfig:
    """The `lora` config section (used when `finetune.train_mode` is `lora`)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # dense module names or path suffixes (a/b)
    split_qkv: bool = False  # three rank-r adapters on c_attn (q, k, v) instead of one

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def validate_lora(cfg: LoRAConfig) -> None:
    if cfg.rank <= 0:
        raise UserError(f"lora.rank must be positive, got {cfg.rank}")
    if not cfg.alpha > 0:
        raise UserError(f"lora.alpha must be positive (the adapters' scale is alpha / rank), got {cfg.alpha}")
    if not cfg.targets or not all(t.strip("/ ") for t in cfg.targets):
        raise UserError("lora.targets is empty or has an empty entry; give all (every dense layer) or name at least one, "
                        "e.g. c_attn")


def matches(path: Sequence[str], targets: Sequence[str]) -> bool:
    """Whether dense module `path` (e.g. `("h_0", "attn", "c_proj")`) is a LoRA target (only
    modules built with adapters are ever asked: never the LM head)."""
    path = tuple(path)
    for target in targets:
        if target.strip() == ALL:
            return True
        parts = tuple(p for p in target.strip("/").split("/") if p)
        if parts and path[-len(parts):] == parts:
            return True
    return False


def _a_init(key, shape, dtype=jnp.float32):
    """uniform(-1/sqrt(in), 1/sqrt(in)) with `in` = shape[-2] (any leading stack axis)."""
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRADense(nn.Dense):
    """`nn.Dense` (same `kernel`/`bias` leaves and math) plus an adapter when targeted.

    fused: how many equal output blocks the kernel concatenates (3 for `c_attn`); with
    `lora.split_qkv` each block gets its own adapter.
    """

    lora: LoRAConfig | None = None
    fused: int = 1

    @nn.compact
    def __call__(self, inputs):
        y = super().__call__(inputs)
        cfg = self.lora
        if cfg is None or not matches(self.path, cfg.targets):
            return y
        d_in = inputs.shape[-1]
        blocks = self.fused if (cfg.split_qkv and self.fused > 1) else 1
        dtype = self.dtype or inputs.dtype
        x = inputs.astype(dtype).reshape(-1, d_in)  # 2-D, as the base matmul (`matmuls.matmul_2d`)
        if blocks == 1:
            a = self.param("lora_a", _a_init, (d_in, cfg.rank))
            b = self.param("lora_b", nn.initializers.zeros, (cfg.rank, self.features))
            delta = (x @ a.astype(dtype)) @ b.astype(dtype)
        else:
            a = self.param("lora_a", _a_init, (blocks, d_in, cfg.rank))
            b = self.param("lora_b", nn.initializers.zeros, (blocks, cfg.rank, self.features // blocks))
            h = jnp.einsum("ni,kir->nkr", x, a.astype(dtype))
            delta = jnp.einsum("nkr,kro->nko", h, b.astype(dtype))
        return y + delta.reshape(y.shape) * jnp.asarray(cfg.scale, dtype)


# ---------------------------------------------------------------------------------------
# Param-tree helpers


def is_lora_leaf(path: tuple[str, ...], leaf: Any = None) -> bool:
    """Label predicate: true for adapter leaves (`.../lora_a`, `.../lora_b`)."""
    return bool(path) and path[-1] in LORA_LEAVES


def has_lora(params) -> bool:
    return any(is_lora_leaf(tuple(getattr(k, "key", str(k)) for k in path))
               for path, _ in jax.tree_util.tree_leaves_with_path(params))


def dense_paths(params) -> list[tuple[str, ...]]:
    """Paths of every module that holds a `kernel` (the dense layers LoRA can target)."""
    out = []

    def walk(node, path):
        if isinstance(node, dict) or hasattr(node, "items"):
            if "kernel" in node:
                out.append(path)
            for k, v in node.items():
                if hasattr(v, "items"):
                    walk(v, path + (k,))

    walk(params, ())
    return out


def check_targets(cfg: LoRAConfig, params) -> None:
    """One-line UserError for a target that matches no dense layer of `params`."""
    denses = dense_paths(params)
    for target in cfg.targets:
        if not any(matches(p, (target,)) for p in denses):
            names = sorted({p[-1] for p in denses})
            raise UserError(f"lora.targets: {target!r} matches no dense layer of this model "
                            f"(dense layers: {', '.join(names)}; a/b path suffixes also work)")


def without_adapters(params):
    """`params` without their `lora_a`/`lora_b` leaves: the frozen base weights a LoRA run
    trains around (every other leaf the same object, so no second copy), which the plain
    model (no `lora`) runs as the run's reference (DPO)."""

    def strip(node, path=()):
        if not hasattr(node, "items"):
            return node
        return {k: strip(v, path + (k,)) for k, v in node.items() if not is_lora_leaf(path + (k,))}

    return strip(params)


def lora_delta(a, b, scale: float):
    """The kernel update `A @ B * scale` (`[in, out]`), for one adapter or a stack of them."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.ndim == 2:
        return (a @ b) * scale
    return np.concatenate([a[i] @ b[i] for i in range(a.shape[0])], axis=-1) * scale


def merge_lora(params, cfg: LoRAConfig | None = None):
    """Plain params: every adapter folded into its kernel (`W + A @ B * alpha/r`), the
    `lora_a`/`lora_b` leaves removed. The plain model on the result matches the LoRA model.

    cfg: the run's `lora` section (its `alpha`; r is read from each adapter's shape). Without
    it the default alpha (`LoRAConfig().alpha`) is assumed, right for any run that did not
    set `lora.alpha`; pass the config when it did."""
    alpha = (cfg or LoRAConfig()).alpha

    def merge(node):
        if not hasattr(node, "items"):
            return node
        node = {k: merge(v) for k, v in node.items()}
        if "lora_a" in node and "lora_b" in node:
            a, b = node.pop("lora_a"), node.pop("lora_b")
            kernel = np.asarray(node["kernel"], np.float32)
            scale = alpha / np.shape(a)[-1]
            node["kernel"] = (kernel + lora_delta(a, b, scale)).astype(np.asarray(node["kernel"]).dtype)
        return node

    return merge(params)


def lora_param_count(params) -> int:
    """Number of adapter weights (the trainable count of LoRA training)."""
    return sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if is_lora_leaf(tuple(getattr(k, "key", str(k)) for k in path)))
