"""Pure training and evaluation steps: `(state, batch, key) -> (state, metrics)`.

Nothing here is jitted or pmapped; `jaxgpt.parallel` does that at the call site. A step is
built from a task's *loss function*

    loss_fn(params, micro_batch, dropout_key | None) -> (loss_sum, sums)

that returns the summed loss and a dict of other sums, one of which is `"count"` (tokens or
examples scored). Steps add these up over gradient-accumulation micro-batches (`lax.scan`)
and, when `axis_name` is set, over devices (`lax.psum`), so the update uses the exact mean
over everything in the global batch. With equal counts per device this is `lax.pmean` of
the per-device mean gradient; with masks (fine-tuning) it stays exact where pmean would not.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxgpt.train.losses import HEAD_CHUNK_TOKENS, head_cross_entropy

LossFn = Callable[[Any, dict, Any], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the optimiser itself is passed to steps)."""

    step: jax.Array  # int32 scalar: optimiser updates done
    params: Any
    opt_state: Any


def create_train_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def lm_loss_fn(model: nn.Module, chunk_size: int = HEAD_CHUNK_TOKENS) -> LossFn:
    """Next-token loss. batch: `inputs`, `targets` `[batch, seq]`, optional `mask` `[batch, seq]`.

    The LM head runs fused into the cross-entropy over `chunk_size`-token slices
    (`jaxgpt.train.losses.head_cross_entropy`): the `[batch, seq, vocab]` logits are never formed."""
    from jaxgpt.models import lm_head_kernel

    def loss_fn(params, batch, dropout_key):
        hidden = model.apply(
            {"params": params},
            batch["inputs"],
            attention_mask=batch.get("attention_mask"),
            deterministic=dropout_key is None,
            return_hidden=True,
            rngs=None if dropout_key is None else {"dropout": dropout_key},
        )
        loss_sum, count = head_cross_entropy(hidden, lm_head_kernel(model.config, params), batch["targets"],
                                             batch.get("mask"), chunk_size=chunk_size)
        return loss_sum, {"count": count}

    return loss_fn


def _psum(tree, axis_name):
    return tree if axis_name is None else lax.psum(tree, axis_name)


def train_step(
    state: TrainState,
    batch: dict,
    key: jax.Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
    labels: Any | None = None,
) -> tuple[TrainState, dict]:
    """One optimiser update.

    batch leaves: `[accum_steps, micro_batch, ...]` (this device's share of the global batch).
    key: the run's dropout stream; folded with the step, the device and the micro-batch so
    no two micro-batches anywhere share a mask.
    labels: the optimiser's label tree (`jaxgpt.train.optim`; None: every leaf trains). Only
    `"train"` leaves are differentiated, summed and reduced across devices; frozen leaves
    get zero gradients that are never computed (a LoRA step skips the frozen weights'
    gradients, the tied head's `[vocab, n_embd]` one included). `grad_norm` is the norm of
    the trainable gradients, the one clipping sees.
    """
    key = jax.random.fold_in(key, state.step)
    if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
    split = _TrainableSplit(state.params, labels)

    def loss_of_trainable(trainable, micro_batch, micro_key):
        return loss_fn(split.merge(trainable), micro_batch, micro_key)

    def accumulate(carry, inputs):
        grads_sum, sums = carry
        micro_batch, index = inputs
        (loss_sum, aux), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(
            split.trainable, micro_batch, jax.random.fold_in(key, index))
        aux = {"loss": loss_sum, **aux}
        grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
        sums = jax.tree_util.tree_map(jnp.add, sums, aux)
        return (grads_sum, sums), None

    accum_steps = jax.tree_util.tree_leaves(batch)[0].shape[0]
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, split.trainable)
    first_micro_batch = jax.tree_util.tree_map(lambda x: x[0], batch)
    zero_sums = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, jnp.float32), _aux_shapes(loss_fn, state.params, first_micro_batch)
    )
    (grads, sums), _ = lax.scan(accumulate, (zero_grads, zero_sums), (batch, jnp.arange(accum_steps)))
    grads, sums = _psum((grads, sums), axis_name)
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    updates, opt_state = tx.update(split.full_gradient(grads), state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v / count for k, v in sums.items() if k != "count"}
    metrics["count"] = sums["count"]
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


class _TrainableSplit:
    """The params as a list of trainable leaves (what `jax.grad` sees) and the frozen rest."""

    def __init__(self, params, labels):
        from jaxgpt.train.optim import TRAIN

        self.leaves, self.treedef = jax.tree_util.tree_flatten(params)
        if labels is None:
            self.flags = [True] * len(self.leaves)
        else:
            self.flags = [label == TRAIN for label in self.treedef.flatten_up_to(labels)]
        self.trainable = [x for x, f in zip(self.leaves, self.flags) if f]

    def _fill(self, trainable, frozen_leaf):
        it = iter(trainable)
        return self.treedef.unflatten([next(it) if f else frozen_leaf(x) for x, f in zip(self.leaves, self.flags)])

    def merge(self, trainable):
        """The full params with `trainable` in place of the trainable leaves."""
        return self._fill(trainable, lambda x: x)

    def full_gradient(self, grads):
        """Gradients shaped like the params (zeros at frozen leaves), for the optimiser."""
        return self._fill(grads, jnp.zeros_like)


def _aux_shapes(loss_fn, params, micro_batch):
    """The aux-sum dict's structure (plus `loss`), traced abstractly to seed the scan carry."""
    loss_sum, aux = jax.eval_shape(lambda p, b: loss_fn(p, b, None), params, micro_batch)
    return {"loss": jax.ShapeDtypeStruct((), jnp.float32), **aux}


def eval_step(params, batch: dict, *, loss_fn: LossFn, axis_name: str | None = None) -> dict:
    """Sums over one evaluation batch (`[batch, ...]` leaves), dropout off: `loss`, `count`, ..."""
    loss_sum, aux = loss_fn(params, batch, None)
    return _psum({"loss": loss_sum, **aux}, axis_name)
