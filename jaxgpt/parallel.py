"""Data parallelism: the only module that calls `jax.pmap` or knows where arrays live.

A global batch of `B` rows becomes `[devices, accum_steps, B / (devices * accum_steps), ...]`;
state is replicated on every local device; gradients are summed across devices inside the
step (`lax.psum` over `AXIS`). With one device the same step function is simply jitted and
the leading device axis is left out, so CPU, GPU and TPU run identical step code.

The training loop and the tasks see only `DataParallel.place(state, ...)`, a `PlacedState`
(update, step, params for evaluation and for sampling, a host copy for checkpoints),
`DataParallel.evaluate` (exact means over eval batches) and `DataParallel.put_frozen`
(a frozen model, e.g. DPO's reference, laid out for the compiled steps): nothing outside
this module branches on the device count.

`jax.pmap` is in maintenance mode in JAX 0.10 (it is built on jit + shard_map); keeping
every use here means a later move to `jit` + `Mesh` sharding touches this file alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgpt.errors import UserError

AXIS = "batch"


def resolve_num_devices(requested: int) -> int:
    """`train.num_devices`: 0 = every local device; more than exist is an error."""
    available = jax.local_device_count()
    if requested == 0:
        return available
    if requested > available:
        raise UserError(
            f"train.num_devices={requested} but only {available} local device(s) exist; "
            "use 0 for all of them"
        )
    return requested


@dataclass(frozen=True)
class DataParallel:
    """How one process lays out state and batches over its local devices."""

    num_devices: int

    @property
    def devices(self):
        return jax.local_devices()[: self.num_devices]

    @property
    def pmap_devices(self):
        """pmap's `devices`: None (every device of every process) in a multi-process run, where
        JAX requires the same global list on each process; else this process's subset."""
        if jax.process_count() > 1:
            if self.num_devices != jax.local_device_count():
                raise UserError("multi-process runs use every local device; leave train.num_devices at 0")
            return None
        return self.devices

    # -- state -------------------------------------------------------------------------
    def replicate(self, tree: Any) -> Any:
        """A fresh on-device copy: steps donate the state, which must not delete the caller's
        arrays (a DPO reference model may be the very params training starts from)."""
        if self.num_devices == 1:
            return jax.device_put(tree, self.devices[0], may_alias=False)
        # Laid out as pmap lays out its outputs (a mesh whose axis is AXIS), so the first
        # step's input state matches every later one and the step compiles once;
        # flax.jax_utils.replicate's '_device_put_sharded' mesh forced a second compilation.
        sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))
        n = self.num_devices

        def put(x):
            x = np.asarray(x)
            return jax.device_put(np.broadcast_to(x, (n,) + x.shape), sharding)

        return jax.tree_util.tree_map(put, tree)

    def unreplicate(self, tree: Any) -> Any:
        """Device 0's copy, fetched to host numpy (what checkpoints and exports take)."""
        if self.num_devices == 1:
            return jax.device_get(tree)
        return jax.tree_util.tree_map(lambda x: x[0], jax.device_get(jax.tree_util.tree_map(_device_0, tree)))

    # -- batches -----------------------------------------------------------------------
    def check_batch_size(self, batch_size: int, accum_steps: int = 1) -> None:
        per = self.num_devices * accum_steps
        if batch_size % per:
            raise UserError(
                f"train.batch_size={batch_size} must be divisible by devices x grad_accum_steps "
                f"= {self.num_devices} x {accum_steps}; change train.batch_size or train.num_devices"
            )

    def shard_train(self, batch: dict, accum_steps: int) -> dict:
        """`[B, ...]` -> `[devices, accum, B/(devices*accum), ...]` (no device axis with one)."""
        self.check_batch_size(len(next(iter(batch.values()))), accum_steps)

        def reshape(x):
            x = np.asarray(x)
            shape = (accum_steps, -1) + x.shape[1:]
            if self.num_devices > 1:
                shape = (self.num_devices,) + shape
            return x.reshape(shape)

        return {k: reshape(v) for k, v in batch.items()}

    def shard_eval(self, batch: dict) -> dict:
        """`[B, ...]` -> `[devices, B/devices, ...]` (unchanged with one device)."""
        if self.num_devices == 1:
            return batch
        return {k: np.asarray(v).reshape((self.num_devices, -1) + np.shape(v)[1:]) for k, v in batch.items()}

    def first(self, tree: Any) -> Any:
        """Metrics that are identical on every device (psum'd): take device 0's."""
        if self.num_devices == 1:
            return tree
        return jax.tree_util.tree_map(lambda x: _device_0(x)[0], tree)

    # -- compiled steps ----------------------------------------------------------------
    def compile_train_step(self, step_fn: Callable, **static) -> Callable:
        """`step_fn(state, batch, key, *, axis_name, **static)` -> jitted or pmapped callable.

        The state argument is donated: its buffers are reused for the new state.
        """
        if self.num_devices == 1:
            return jax.jit(functools.partial(step_fn, axis_name=None, **static), donate_argnums=0)
        return jax.pmap(
            functools.partial(step_fn, axis_name=AXIS, **static),
            axis_name=AXIS,
            in_axes=(0, 0, None),
            donate_argnums=0,
            devices=self.pmap_devices,
        )

    def compile_eval_step(self, eval_fn: Callable, **static) -> Callable:
        """`eval_fn(params, batch, *, axis_name, **static)` -> jitted or pmapped callable."""
        if self.num_devices == 1:
            return jax.jit(functools.partial(eval_fn, axis_name=None, **static))
        return jax.pmap(
            functools.partial(eval_fn, axis_name=AXIS, **static),
            axis_name=AXIS,
            devices=self.pmap_devices,
        )


    def put_frozen(self, tree: Any) -> Any:
        """A frozen pytree (reference or reward model) laid out for this layout's compiled
        steps; unlike the train state it is never donated, so one device may alias it."""
        return self.replicate(tree) if self.num_devices > 1 else tree

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

    def place(self, state: Any, step_fn: Callable, accum_steps: int = 1, **static) -> "PlacedState":
        """`state` (a `jaxgpt.steps.TrainState`) on this layout's devices, with `step_fn`
        compiled for it (`compile_train_step(step_fn, **static)`)."""
        return PlacedState(self, self.replicate(state), self.compile_train_step(step_fn, **static), accum_steps)


class PlacedState:
    """A train state laid out by a `DataParallel`, and the compiled step that updates it."""

    def __init__(self, dp: DataParallel, state: Any, p_train: Callable, accum_steps: int):
        self.dp, self.state, self._p_train, self.accum_steps = dp, state, p_train, accum_steps

    def update(self, batch: dict, key) -> dict:
        """One optimiser update on the host batch `[B, ...]` (this process's rows); returns
        its metrics, psum'd over devices (device arrays: reading them syncs)."""
        self.state, metrics = self._p_train(self.state, self.dp.shard_train(batch, self.accum_steps), key)
        return self.dp.first(metrics)

    @property
    def step(self) -> int:
        """Optimiser updates done."""
        return int(self.dp.first(self.state.step))

    @property
    def params(self) -> Any:
        """The params as this layout's compiled eval steps take them."""
        return self.state.params

    def local_params(self) -> Any:
        """The params on one device (device 0's replica), for sampling and jitted scoring."""
        return self.dp.first(self.state.params)

    def host(self) -> dict:
        """`{"step", "params", "opt_state"}` as host arrays (one copy): what Orbax saves."""
        state = self.dp.unreplicate(self.state)
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _device_0(x):
    """Device 0's buffer of a pmapped array, `[1, ...]`, taken without running anything on
    the other devices. `x[0]` runs a slicing program on every device; dispatched between
    train steps, those programs deadlocked XLA:CPU's all-reduce over 4 host devices on 2
    cores (the default pretraining aborted in 3 of ~10 runs; 0 of 8 with this)."""
    return x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x)[:1]

