"""A run's initial parameters: `--init` weights grafted into a fresh model, and the label
tree of the train mode (which leaves the optimiser updates; `jaxgpt.train.optim`).

Train modes (`finetune.train_mode`; pretraining trains everything, with no label tree):

    full        every parameter trains
    last-block  the last transformer block h_{n-1}, the final LayerNorm ln_f and the task head
    lora        only the LoRA adapters (`lora_a`, `lora_b`); everything else, the head
                included, is frozen (put the head in lora.targets to adapt it)

A PPO value head is new to every run, so it trains in every mode.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import TRAIN_MODES
from jaxgpt.errors import UserError
from jaxgpt.models.lora import check_targets, is_lora_leaf

# Top-level parameters that belong to a task head rather than to the transformer: an --init
# checkpoint need not have them (a head of another shape starts fresh).
HEAD_PARAMS = ("score", "value_head")
ALWAYS_TRAINED = ("value_head",)


def init_from(spec: str, cfg):
    """`(cfg, params)` for `--init SPEC` (`jaxgpt.io.hub.resolve_init`): the model section
    becomes the checkpoint's shape, keeping this run's dropout, compute dtype, attention
    kernel and remat settings; a LoRA run's adapters come merged."""
    from jaxgpt.io.hub import resolve_init

    model_cfg, params = resolve_init(spec)
    keep = {k: getattr(cfg.model, k) for k in ("dropout", "dtype", "attention", "remat", "remat_policy")}
    return dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, **keep)), params


def graft(fresh, loaded, source: str):
    """`fresh` with every leaf that `loaded` has at the same path replaced by the loaded one.

    The transformer (wte, wpe, h_i, ln_f) must all be in `loaded`; `lm_head` and other
    leaves the task model lacks are dropped; a head whose shape differs stays fresh."""
    from flax import traverse_util

    flat_fresh = traverse_util.flatten_dict(fresh)
    flat_loaded = traverse_util.flatten_dict(loaded)
    out = {}
    for path, leaf in flat_fresh.items():
        name = "/".join(path)
        got = flat_loaded.get(path)
        if got is None:
            if path[0] not in HEAD_PARAMS and not is_lora_leaf(path):
                raise UserError(f"--init {source}: missing parameter {name} {list(leaf.shape)}")
            out[path] = leaf
        elif tuple(np.shape(got)) != tuple(leaf.shape):
            if path[0] in HEAD_PARAMS:
                out[path] = leaf  # another task's head: start this one fresh
            else:
                raise UserError(f"--init {source}: {name} is {list(np.shape(got))}, this model expects {list(leaf.shape)}")
        else:
            out[path] = jnp.asarray(got, leaf.dtype)
    return traverse_util.unflatten_dict(out)


def train_labels(params, mode: str, n_layer: int):
    """The label tree of `mode` (see the module docstring) over `params`."""
    from jaxgpt.train.optim import label_params

    if mode == "full":
        return label_params(params, lambda path, leaf: True)
    if mode == "last-block":
        trainable = {f"h_{n_layer - 1}", "ln_f", *HEAD_PARAMS}
        return label_params(params, lambda path, leaf: path[0] in trainable)
    if mode == "lora":
        return label_params(params, lambda path, leaf: is_lora_leaf(path) or path[0] in ALWAYS_TRAINED)
    raise UserError(f"unknown train mode {mode!r}; choose one of {', '.join(TRAIN_MODES)}")


def check_lora_targets(cfg, model_attrs: dict) -> None:
    """Every lora.targets entry must match a dense layer of the model (checked on shapes)."""
    from jaxgpt.models.gpt2 import param_shapes

    plain = {k: v for k, v in model_attrs.items() if k != "lora"}
    check_targets(cfg.lora, param_shapes(cfg.model, **plain))


def param_counts(params, labels) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    from jaxgpt.train.optim import count_trainable

    total = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))
    return count_trainable(params, labels), total


__all__ = ["ALWAYS_TRAINED", "HEAD_PARAMS", "TRAIN_MODES", "check_lora_targets", "graft", "init_from",
           "param_counts", "train_labels"]
