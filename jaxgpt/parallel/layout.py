"""What every device layout offers the engine (`DataParallel`, `MeshParallel`), and the
`PlacedState` that the loop trains: nothing above `jaxgpt.parallel` branches on a layout."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax


class Layout:
    """A device layout: how state, batches and compiled steps are placed.

    Subclasses give `shard_train(batch [B, ...], accum) -> the step's batch`,
    `shard_eval(batch) -> the eval step's batch`, `first(tree)` (a value the step left
    identical everywhere, readable on the host), `local(params)` (placed params as jitted
    code on this process uses them: sampling, scoring), `put_local(tree)` (a frozen host tree
    placed beside them), `saveable(state)` (what Orbax saves), `replicate` (place a state),
    `put_frozen` (a frozen tree for the compiled steps), `compile_train_step`,
    `compile_eval_step`, `check_batch_size`, `describe()`, `num_devices` (this process's),
    `device_count` (the run's) and `batch_shards` (how many ways the batch rows are split).
    """

    num_devices: int

    def evaluate(self, p_eval: Callable, params: Any, batches: Iterable[dict]) -> dict:
        """Exact means over every batch of a compiled eval step: sum each metric, divide by
        the summed `count`. `params` as `PlacedState.params` gives them."""
        totals: dict[str, float] = {}
        for batch in batches:
            sums = jax.device_get(self.first(p_eval(params, self.shard_eval(batch))))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        count = totals.pop("count", 0.0)
        return {k: v / count for k, v in totals.items()} if count else {}

    def initialise(self, init: Callable, key, jit: bool = False) -> Any:
        """Params from `init(key)`, made where this layout keeps them (replicas: one device;
        `jit`: one compiled call rather than op by op; a mesh: already sharded)."""
        return (jax.jit(init) if jit else init)(key)

    def place(self, state: Any, step_fn: Callable, accum_steps: int = 1, **static) -> "PlacedState":
        """`state` (a `jaxgpt.train.steps.TrainState`, host or restored arrays) laid out on the
        devices, with `step_fn` compiled for it (`compile_train_step(step_fn, **static)`)."""
        placed = self.replicate(state)
        return PlacedState(self, placed, self.compile_train_step(step_fn, state=placed, **static), accum_steps)

    def restore_target(self, state: Any) -> Any:
        """The abstract tree a checkpoint of `state` restores into (with this layout's
        shardings where it has them, so a sharded restore never gathers)."""
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


class PlacedState:
    """A train state laid out by a `Layout`, and the compiled step that updates it."""

    def __init__(self, layout: Layout, state: Any, p_train: Callable, accum_steps: int):
        self.layout, self.state, self._p_train, self.accum_steps = layout, state, p_train, accum_steps

    def update(self, batch: dict, key) -> dict:
        """One optimiser update on the host batch `[B, ...]` (this process's rows); returns
        its metrics, reduced over devices (device arrays: reading them syncs)."""
        self.state, metrics = self._p_train(self.state, self.layout.shard_train(batch, self.accum_steps), key)
        return self.layout.first(metrics)

    @property
    def step(self) -> int:
        """Optimiser updates done."""
        return int(self.layout.first(self.state.step))

    @property
    def params(self) -> Any:
        """The params as this layout's compiled eval steps take them."""
        return self.state.params

    def local_params(self) -> Any:
        """The params for jitted code on this process (sampling, rollouts, scoring)."""
        return self.layout.local(self.state.params)

    def host(self) -> dict:
        """`{"step", "params", "opt_state"}` as Orbax saves them (replicas: one host copy;
        a mesh: the sharded arrays, each process writing its own shards)."""
        state = self.layout.saveable(self.state)
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
