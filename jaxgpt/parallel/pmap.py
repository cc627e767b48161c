"""Data parallelism with `jax.pmap` (the default layout): state replicated on every local
device, each device a slice of the batch.

A global batch of `B` rows becomes `[devices, accum_steps, B / (devices * accum_steps), ...]`;
gradients are summed across devices inside the step (`lax.psum` over `AXIS`). With one
device the same step function is simply jitted and the leading device axis is left out, so
CPU, GPU and TPU run identical step code. `jax.pmap` is in maintenance mode in JAX 0.10 (it
is built on jit + shard_map); `jaxgpt.parallel.mesh` is the jit + `Mesh` layout.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgpt.errors import UserError
from jaxgpt.parallel.layout import Layout

AXIS = "batch"


@dataclass(frozen=True)
class DataParallel(Layout):
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
    def compile_train_step(self, step_fn: Callable, state: Any = None, **static) -> Callable:
        """`step_fn(state, batch, key, *, axis_name, **static)` -> jitted or pmapped callable.

        The state argument is donated: its buffers are reused for the new state. (`state`,
        the placed state, is for layouts whose compiled steps need its shardings.)
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

    def local(self, tree: Any) -> Any:
        return self.first(tree)

    def put_local(self, tree: Any) -> Any:
        return jax.device_put(tree, self.devices[0])

    @property
    def device_count(self) -> int:
        return self.num_devices * jax.process_count()

    @property
    def batch_shards(self) -> int:
        return self.num_devices

    def restore_target(self, state: Any) -> Any:
        device = jax.sharding.SingleDeviceSharding(self.devices[0])
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)

    def saveable(self, tree: Any) -> Any:
        return self.unreplicate(tree)

    def describe(self) -> str:
        return f"devices: {self.num_devices} x {jax.process_count()} process(es)"


def _device_0(x):
    """Device 0's buffer of a pmapped array, `[1, ...]`, taken without running anything on
    the other devices. `x[0]` runs a slicing program on every device; dispatched between
    train steps, those programs deadlocked XLA:CPU's all-reduce over 4 host devices on 2
    cores (the default pretraining aborted in 3 of ~10 runs; 0 of 8 with this)."""
    return x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x)[:1]

