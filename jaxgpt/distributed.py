"""Multi-host start-up: JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same `train.py`. After `initialize`, `jax.devices()` lists the
devices of all processes, `jax.local_devices()` this process's; the pmapped step's
`lax.psum` then reduces over every device of every process. Data is split by
`jax.process_index()` (see `jaxgpt.data`), and only process 0 prints and writes files.
"""
from __future__ import annotations

import os

import jax

from jaxgpt.errors import UserError

# Environments where `jax.distributed.initialize()` finds its peers by itself.
_AUTO_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
             "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True) -> bool:
    """Start the multi-process runtime if asked (flags) or detected (TPU pod, SLURM, MPI).

    Returns True when running multi-process. On CPU, cross-process collectives go through
    gloo, which JAX needs to be told before the backend starts.
    """
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit:
        if coordinator is None or num_processes is None or process_id is None:
            raise UserError("multi-host needs all of --coordinator HOST:PORT, --num-processes N and --process-id I")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise UserError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    elif not (auto and any(os.environ.get(k) for k in _AUTO_ENV)):
        return False
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _only_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return jax.process_count() > 1


def _only_cpu() -> bool:
    """True when no accelerator plugin is installed (checked without starting a backend)."""
    try:
        import importlib.util

        return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
    except (ImportError, ValueError):
        return True
