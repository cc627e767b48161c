"""AdamW with warmup + cosine decay, global-norm clipping, and one freezing mechanism.

Which parameters train is a *label tree* over the params (`"train"` / `"freeze"`) fed to
`optax.multi_transform`: frozen leaves get `optax.set_to_zero()` and therefore no Adam
moments at all. Full fine-tuning, last-block training and LoRA are just different label
trees; there is no separate code path per mode.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from jaxgpt.config import TrainConfig

TRAIN, FREEZE = "train", "freeze"


def lr_schedule(cfg: TrainConfig, total_steps: int | None = None) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr`, then cosine decay to `cfg.lr * cfg.min_lr_ratio`."""
    total = total_steps or cfg.max_steps
    warmup = min(cfg.warmup_steps, max(total - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params) -> Any:
    """Weight decay on matrices only (kernels, embeddings); never on biases or LayerNorm."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    cfg: TrainConfig,
    labels: Any | None = None,
    total_steps: int | None = None,
) -> optax.GradientTransformation:
    """The optimiser for every task.

    labels: a pytree shaped like the params with leaves `"train"` or `"freeze"` (None: all
    train). Clipping sees only the trainable gradients, since it sits inside the "train"
    branch.
    """
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if labels is None:
        return tx
    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)


def label_params(params, is_trainable: Callable[[tuple[str, ...], Any], bool]) -> Any:
    """Label tree from a predicate on each leaf's path (a tuple of dict keys)."""

    def label(path, leaf):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        return TRAIN if is_trainable(keys, leaf) else FREEZE

    return jax.tree_util.tree_map_with_path(label, params)


def count_trainable(params, labels) -> int:
    if labels is None:
        return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    sizes = jax.tree_util.tree_map(lambda p, l: int(p.size) if l == TRAIN else 0, params, labels)
    return sum(jax.tree_util.tree_leaves(sizes))
