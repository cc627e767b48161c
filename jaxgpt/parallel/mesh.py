"""Sharded training: the same pure `train_step`, jitted over a device mesh
`(data, fsdp, tensor)` with `NamedSharding`s, for models whose replicas do not fit a device.

    params, gradients, AdamW moments   each matrix split over `fsdp` along a divisible
                                       dimension (the largest `tensor` left free); leaves under
                                       `MIN_SHARDED` elements replicated
                                       `tensor` (Megatron): the dimension whose logical axis
                                       (`Family.logical_axes`) is attention heads, q|k|v or MLP
                                       hidden units: GPT-2's c_attn / c_fc by columns (their
                                       bias too), c_proj by rows; Llama's q/k/v/gate/up by
                                       columns, o/down by rows (k/v only where tensor divides
                                       the KV heads); XLA adds the all-reduces
    batch                              rows over (data, fsdp): `[accum, micro, ...]` shards
                                       `micro`; each process places only its own rows

No psum is written: the loss sums over the global batch, and XLA inserts the collectives
the shardings imply. Devices are laid out process by process (`jax.devices()` order), so a
process's rows of the global batch land on its own devices. Dropout keys are not folded with
a device index: with JAX's partitionable threefry the masks are those of one device.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.errors import UserError
from jaxgpt.parallel.layout import Layout

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the mesh axes the batch rows are split over
MIN_SHARDED = 2 ** 14  # smaller leaves (biases, LayerNorms, LoRA adapters of small models) stay replicated
TENSOR_AXES = ("qkv", "heads", "kv_heads", "mlp")  # logical axes `tensor` splits (jaxgpt.models.family)


def resolve_axes(data: int, fsdp: int, tensor: int, devices: int) -> tuple[int, int, int]:
    """The mesh shape for `devices`: one axis may be -1 (the rest of the devices)."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh.data, mesh.fsdp, mesh.tensor must be >= 1, one of them may be -1 (the rest); "
                        f"got {data}, {fsdp}, {tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices % known:
            raise UserError(f"mesh axes {data} x {fsdp} x {tensor}: {devices} devices do not split by {known}")
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        raise UserError(f"mesh.data x mesh.fsdp x mesh.tensor = {' x '.join(map(str, sizes))} = {math.prod(sizes)}, "
                        f"but there are {devices} devices; make the product {devices} (or set one axis to -1)")
    return tuple(sizes)


def param_spec(path: tuple, shape: tuple[int, ...], fsdp: int, tensor: int, model=None) -> P:
    """The PartitionSpec of a parameter (or of an optimiser moment, whose path ends with the
    parameter's path) of a `model` (a ModelConfig; default GPT-2's), from its family's logical
    axes and its shape."""
    from jaxgpt.config import ModelConfig
    from jaxgpt.models import family_of

    model = model or ModelConfig()
    axes = family_of(model).logical_axes(tuple(str(p) for p in path), tuple(shape))
    spec: list[Any] = [None] * len(shape)
    if tensor > 1:
        for d, axis in enumerate(axes):
            whole_heads = axis != "kv_heads" or model.kv_heads % tensor == 0
            if axis in TENSOR_AXES and shape[d] % tensor == 0 and whole_heads:
                spec[d] = "tensor"
                break
    if fsdp > 1 and len(shape) >= 2 and math.prod(shape) >= MIN_SHARDED:
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if spec[d] is None and shape[d] % fsdp == 0:
                spec[d] = "fsdp"
                break
    return P(*spec)


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


@dataclass(frozen=True)
class MeshParallel(Layout):
    """jit over `Mesh(devices, ("data", "fsdp", "tensor"))`; see the module docstring."""

    data: int
    fsdp: int
    tensor: int
    devices: tuple = field(default=None, repr=False)
    model: Any = field(default=None, repr=False)  # the ModelConfig whose params it lays out (None: GPT-2's)

    def __post_init__(self):
        devices = tuple(self.devices or jax.devices())
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "mesh", Mesh(np.array(devices).reshape(self.data, self.fsdp, self.tensor), AXES))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        return (f"mesh data {self.data} x fsdp {self.fsdp} x tensor {self.tensor} = {self.num_devices} devices "
                f"x {jax.process_count()} process(es)")

    def check_model(self, model_cfg) -> None:
        """`tensor` must split the attention heads and the MLP's hidden units (key/value heads
        it does not divide stay whole on every device)."""
        t = self.tensor
        if model_cfg.n_head % t or model_cfg.mlp_width % t:
            raise UserError(f"mesh.tensor={t} must divide model.n_head={model_cfg.n_head} and the MLP width "
                            f"{model_cfg.mlp_width}; choose a divisor")

    def check_batch_size(self, batch_size: int, accum_steps: int = 1) -> None:
        """`batch_size`: this process's rows of the global batch."""
        rows = self.data * self.fsdp * accum_steps // jax.process_count()
        if rows == 0 or batch_size % rows:
            raise UserError(f"train.batch_size must be divisible by mesh.data x mesh.fsdp x train.grad_accum_steps "
                            f"= {self.data} x {self.fsdp} x {accum_steps}; change train.batch_size or the mesh")

    # -- shardings ---------------------------------------------------------------------------
    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def shardings(self, tree: Any) -> Any:
        """NamedShardings of a state / params / optimiser-state tree, leaf by leaf."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self.sharding(param_spec(_names(path), tuple(np.shape(x)), self.fsdp, self.tensor,
                                                     self.model)), tree)

    def _put(self, x, sharding: NamedSharding):
        """A global array from a host value every process holds whole (or a sharded array)."""
        if isinstance(x, jax.Array) and getattr(x, "sharding", None) == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(np.asarray(x), sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def replicate(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(self._put, tree, self.shardings(tree))

    def initialise(self, init: Callable, key, jit: bool = False) -> Any:
        """`init(key)` (params) created already sharded: one jitted call whose outputs land in
        their shardings, so no device ever holds the whole model (jit whatever `jit` says: an
        op-by-op init runs on one device)."""
        abstract = jax.eval_shape(init, key)
        return jax.jit(init, out_shardings=self.shardings(abstract))(key)

    def put_frozen(self, tree: Any) -> Any:
        return self.replicate(tree)

    def put_local(self, tree: Any) -> Any:
        return self.replicate(tree) if jax.process_count() == 1 else jax.device_get(tree)

    @property
    def device_count(self) -> int:
        return len(self.devices)

    @property
    def batch_shards(self) -> int:
        return self.data * self.fsdp

    def restore_target(self, state: Any) -> Any:
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      state, self.shardings(state))

    def _batch(self, x, spec: P):
        x = np.asarray(x)
        sharding = self.sharding(spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        axis = list(spec).index(BATCH)
        global_shape = x.shape[:axis] + (x.shape[axis] * jax.process_count(),) + x.shape[axis + 1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    def shard_train(self, batch: dict, accum_steps: int) -> dict:
        """This process's `[B, ...]` rows -> global `[accum, micro, ...]`, micro over (data, fsdp)."""
        self.check_batch_size(len(next(iter(batch.values()))), accum_steps)
        return {k: self._batch(np.asarray(v).reshape((accum_steps, -1) + np.shape(v)[1:]), P(None, BATCH))
                for k, v in batch.items()}

    def shard_eval(self, batch: dict) -> dict:
        return {k: self._batch(v, P(BATCH)) for k, v in batch.items()}

    def first(self, tree: Any) -> Any:
        """A replicated value, readable on this host (its first local shard)."""
        return jax.tree_util.tree_map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)

    def local(self, tree: Any) -> Any:
        """Sharded params serve jitted code as they are; with several processes, code that
        runs on one process alone (sampling) needs a whole copy: gathered (a collective)."""
        if jax.process_count() == 1:
            return tree
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)

    def saveable(self, tree: Any) -> Any:
        return tree

    # -- compiled steps ----------------------------------------------------------------------
    def compile_train_step(self, step_fn: Callable, state: Any = None, **static) -> Callable:
        state_sh = self.shardings(state)
        batch_sh = self.sharding(P(None, BATCH))
        replicated = self.sharding(P())
        return jax.jit(functools.partial(step_fn, axis_name=None, **static),
                       in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated),
                       donate_argnums=0)

    def compile_eval_step(self, eval_fn: Callable, **static) -> Callable:
        return jax.jit(functools.partial(eval_fn, axis_name=None, **static))
