"""A run's initial parameters: `--init` weights grafted into a fresh model, and the label
tree of the train mode (which leaves the optimiser updates; `jaxgpt.train.optim`).

Train modes (`finetune.train_mode`; pretraining trains everything, with no label tree):

    full        every parameter trains
    last-block  the last transformer block and the final norm (the family's `block(n - 1)` and
                `final_norm`: GPT-2's h_{n-1} and ln_f) and the task head
    lora        only the LoRA adapters (`lora_a`, `lora_b`); everything else, the head
                included, is frozen (put the head in lora.targets to adapt it)

A PPO value head is new to every run, so it trains in every mode.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import INIT_KEPT, TRAIN_MODES
from jaxgpt.errors import UserError
from jaxgpt.models import family_of, param_shapes
from jaxgpt.models.layers import HEAD_PARAMS  # a task head: an --init checkpoint need not have it
from jaxgpt.models.lora import check_targets, is_lora_leaf

ALWAYS_TRAINED = ("value_head",)


def init_from(spec: str, cfg):
    """`(cfg, params)` for `--init SPEC` (`jaxgpt.io.hub.resolve_init`): the model section
    becomes the checkpoint's shape, keeping this run's dropout, compute dtype, attention
    kernel, remat and weight storage settings; a LoRA run's adapters come merged."""
    from jaxgpt.io.hub import resolve_init

    model_cfg, params = resolve_init(spec)
    keep = {k: getattr(cfg.model, k) for k in INIT_KEPT}
    return dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, **keep)), params


def graft(fresh, loaded, source: str, *, consume: bool = False):
    """`fresh` with every leaf that `loaded` has at the same path replaced by the loaded one.

    The transformer (embeddings, blocks, final norm) must all be in `loaded`; `lm_head` and
    other leaves the task model lacks are dropped; a head whose shape differs stays fresh.
    `consume`: remove each leaf from `loaded` once grafted, so a large checkpoint is never held
    twice (the driver's `--init`)."""
    from flax import traverse_util

    flat_fresh = traverse_util.flatten_dict(fresh)
    loaded_paths = set(traverse_util.flatten_dict(loaded))
    out = {}
    for path, leaf in flat_fresh.items():
        name = "/".join(path)
        got = None if path not in loaded_paths else _take(loaded, path) if consume else _leaf(loaded, path)
        if got is None:
            if path[0] not in HEAD_PARAMS and not is_lora_leaf(path):
                raise UserError(f"--init {source}: missing parameter {name} {list(leaf.shape)}")
            out[path] = leaf
        elif tuple(np.shape(got)) != tuple(leaf.shape):
            if path[0] in HEAD_PARAMS:
                out[path] = leaf  # another task's head: start this one fresh
            else:
                raise UserError(f"--init {source}: {name} is {list(np.shape(got))}, this model expects {list(leaf.shape)}")
        else:  # where the fresh leaf is (a mesh: its shards), never whole on one device first
            host = np.asarray(jax.device_get(got), leaf.dtype)
            out[path] = (jax.make_array_from_callback(host.shape, leaf.sharding, lambda index, h=host: h[index])
                         if isinstance(leaf, jax.Array) else jnp.asarray(host))
    return traverse_util.unflatten_dict(out)


def _leaf(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _take(tree: dict, path: tuple[str, ...]):
    """Remove and return the leaf at `path` of a nested dict (released once grafted)."""
    return _leaf(tree, path[:-1]).pop(path[-1])


def train_labels(params, mode: str, model_cfg):
    """The label tree of `mode` (see the module docstring) over `params` of `model_cfg`."""
    from jaxgpt.train.optim import label_params

    if mode == "full":
        return label_params(params, lambda path, leaf: True)
    if mode == "last-block":
        trainable = {*family_of(model_cfg).last_block_params(model_cfg), *HEAD_PARAMS}
        return label_params(params, lambda path, leaf: path[0] in trainable)
    if mode == "lora":
        return label_params(params, lambda path, leaf: is_lora_leaf(path) or path[0] in ALWAYS_TRAINED)
    raise UserError(f"unknown train mode {mode!r}; choose one of {', '.join(TRAIN_MODES)}")


def check_lora_targets(cfg, model_attrs: dict) -> None:
    """Every lora.targets entry must match a dense layer of the model (checked on shapes)."""
    plain = {k: v for k, v in model_attrs.items() if k != "lora"}
    check_targets(cfg.lora, param_shapes(cfg.model, **plain))


def param_counts(params, labels) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    from jaxgpt.train.optim import count_trainable

    total = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))
    return count_trainable(params, labels), total


__all__ = ["ALWAYS_TRAINED", "HEAD_PARAMS", "TRAIN_MODES", "check_lora_targets", "graft", "init_from",
           "param_counts", "train_labels"]
