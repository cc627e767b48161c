"""The model library: one module per model family, found through one lookup.

    family = family_of(cfg.model)                # cfg.model.family: gpt2 | llama | qwen3 | gemma3
    model = family.build(cfg.model)              # a flax linen module: apply(params, tokens) -> logits
    params = family.init_params(cfg.model, key)  # or init_params(cfg.model, key): a plain dict pytree

Everything outside this package reaches a family only through `Family` (`jaxgpt.models.family`):
building the module with its heads, params, the KV cache, the LM-head kernel for the fused
loss, the parameter paths train modes and `--init` need, default LoRA targets, FLOPs per
token, logical axes for sharding, and the Hugging Face converter. Shared pieces live beside
the families: attention kernels (`attention`), what the backward pass keeps (`recompute`),
LoRA (`lora`), the trunk, heads and cache every family uses (`layers`).

This module imports nothing heavy: the config and the command line consult it before jax.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from jaxgpt.models.family import Family

# model.family -> the module that defines it (its `FAMILY`). Adding a family: one module and one line.
FAMILY_MODULES: dict[str, str] = {
    "gpt2": "jaxgpt.models.gpt2",
    "llama": "jaxgpt.models.llama",
    "qwen3": "jaxgpt.models.qwen3",
    "gemma3": "jaxgpt.models.gemma3",
}


def get_family(name: str) -> "Family":
    """The `Family` named `name` (`model.family`)."""
    if name not in FAMILY_MODULES:
        from jaxgpt.errors import UserError

        raise UserError(f"unknown model.family {name!r}; choose one of {', '.join(FAMILY_MODULES)}")
    return importlib.import_module(FAMILY_MODULES[name]).FAMILY


def family_of(config) -> "Family":
    """The family of a `ModelConfig`."""
    return get_family(config.family)


def families() -> list["Family"]:
    return [get_family(name) for name in FAMILY_MODULES]


def family_of_params(params) -> "Family":
    """The family whose parameter names `params` has (its token embedding and first block)."""
    for family in families():
        if family.token_embedding in params and family.block(0) in params:
            return family
    from jaxgpt.errors import UserError

    raise UserError(f"params with top-level names {sorted(params)[:5]} are no known family's "
                    f"({', '.join(FAMILY_MODULES)})")


def build_model(config, **attrs) -> Any:
    """`family_of(config).build(config, **attrs)`: the linen module (attrs: num_classes,
    value_head, lora)."""
    return family_of(config).build(config, **attrs)


def init_params(config, key, seq_len: int = 8, **attrs):
    """Float32 params for `config` (a plain dict pytree, no `{"params": ...}` wrapper)."""
    return family_of(config).init_params(config, key, seq_len, **attrs)


def param_shapes(config, **attrs):
    """Parameter shapes (`jax.ShapeDtypeStruct`s) without allocating."""
    return family_of(config).param_shapes(config, **attrs)


def init_cache(config, batch_size: int, max_len: int | None = None):
    return family_of(config).init_cache(config, batch_size, max_len)


def lm_head_kernel(config, params):
    return family_of(config).lm_head_kernel(config, params)


def count_params(params) -> int:
    import math

    import jax

    return sum(int(math.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


__all__ = ["FAMILY_MODULES", "build_model", "count_params", "families", "family_of", "family_of_params", "get_family", "init_cache",
           "init_params", "lm_head_kernel", "param_shapes"]
