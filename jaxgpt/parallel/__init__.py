"""Device layouts: the only package that calls `jax.pmap`, builds a mesh or knows where
arrays live.

    DataParallel(n)        the default: `jax.pmap` replicas on n local devices (jaxgpt.parallel.pmap)
    MeshParallel(d, f, t)  `jax.jit` over a (data, fsdp, tensor) mesh of every device, for
                           models whose replicas do not fit (jaxgpt.parallel.mesh)

`layout_for(cfg)` picks one from the config's `train.num_devices` and `mesh` section. The
engine sees only the `Layout` interface (jaxgpt.parallel.layout): `place(state, step_fn)` ->
a `PlacedState` (update, step, params for evaluation and for sampling, what checkpoints
save), `evaluate` (exact means over eval batches), `put_frozen` (a frozen model laid out for
the compiled steps) and `restore_target` (the abstract state a checkpoint restores into).
"""
from __future__ import annotations

import jax

from jaxgpt.errors import UserError
from jaxgpt.parallel.layout import Layout, PlacedState
from jaxgpt.parallel.mesh import MeshParallel, resolve_axes
from jaxgpt.parallel.pmap import DataParallel


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


def layout_for(cfg) -> Layout:
    """The layout of a run's config: a mesh when `mesh` asks for one (any axis not 1), else
    pmap data parallelism over `train.num_devices` local devices."""
    m = getattr(cfg, "mesh", None)
    if m is None or (m.data, m.fsdp, m.tensor) == (1, 1, 1):
        return DataParallel(resolve_num_devices(cfg.train.num_devices))
    if cfg.train.num_devices:
        if jax.process_count() > 1:
            raise UserError("a multi-process mesh spans every device; leave train.num_devices at 0")
        devices = jax.local_devices()[: resolve_num_devices(cfg.train.num_devices)]
    else:
        devices = jax.devices()
    layout = MeshParallel(*resolve_axes(m.data, m.fsdp, m.tensor, len(devices)), devices=tuple(devices), model=cfg.model)
    layout.check_model(cfg.model)
    return layout


__all__ = ["DataParallel", "Layout", "MeshParallel", "PlacedState", "layout_for", "resolve_num_devices"]
