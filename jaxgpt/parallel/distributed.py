"""Multi-host start-up: JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same `train.py`. After `initialize`, `jax.devices()` lists the
devices of all processes, `jax.local_devices()` this process's; the pmapped step's
`lax.psum` then reduces over every device of every process. Data is split by
`jax.process_index()` (see `jaxgpt.data`), and only process 0 prints and writes files.

A dead host never hangs the others: every process runs a `PeerWatchdog` thread that bumps
its own heartbeat counter in the coordination service's key-value store and watches the
others'. A process whose counter has not moved for `peer_timeout` seconds (default 60,
`--peer-timeout` / `$JAXGPT_PEER_TIMEOUT`) is dead or hung: the watcher prints one line and
exits with code 2, within `peer_timeout` + one poll of the death, instead of waiting in a
collective for gloo's or JAX's much longer timeouts (JAX's own heartbeat check aborts with a
stack trace after about a minute and a half). A process that exits normally says so first,
so the others stop watching it. Every process then resumes with `--resume RUN`.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any, Callable

import jax

from jaxgpt.errors import UserError

PEER_TIMEOUT_ENV = "JAXGPT_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 60.0
_PREFIX = "jaxgpt/watchdog"

# Environments where `jax.distributed.initialize()` finds its peers by itself.
_AUTO_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
             "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True, peer_timeout: float | None = None) -> bool:
    """Start the multi-process runtime if asked (flags) or detected (TPU pod, SLURM, MPI).

    Returns True when running multi-process. On CPU, cross-process collectives go through
    gloo, which JAX needs to be told before the backend starts. `peer_timeout`: seconds
    without a heartbeat after which a peer counts as dead (None: `$JAXGPT_PEER_TIMEOUT` or 60).
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
    timeout = resolve_peer_timeout(peer_timeout)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _only_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    if jax.process_count() > 1:
        start_watchdog(timeout)
    return jax.process_count() > 1


def resolve_peer_timeout(value: float | None) -> float:
    """`value`, else `$JAXGPT_PEER_TIMEOUT`, else 60 s; must be a positive number."""
    raw: Any = value if value is not None else os.environ.get(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT)
    try:
        timeout = float(raw)
    except (TypeError, ValueError):
        timeout = float("nan")
    if not timeout > 0 or timeout == float("inf"):
        raise UserError(f"the peer timeout (--peer-timeout / ${PEER_TIMEOUT_ENV}) must be a positive number "
                        f"of seconds, got {raw!r}")
    return timeout


def _die(msg: str) -> None:
    """One line on stderr, then exit 2 at once: the main thread may be stuck in a collective."""
    try:
        sys.stderr.write(f"\nerror: {msg}\n")  # on its own line, after any progress bar
        sys.stderr.flush()
    finally:
        os._exit(2)


class PeerWatchdog(threading.Thread):
    """Heartbeats through the coordination service's key-value store (see the module doc).

    `client` needs `key_value_increment(key, n)`, `key_value_dir_get(prefix)` and
    `key_value_set(key, value, allow_overwrite)` (jax's DistributedRuntimeClient); `on_dead`
    gets the one-line message (default: print it and exit 2). Counters, not clocks, are
    compared, so hosts need no synchronised time.
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout: float,
                 on_dead: Callable[[str], None] = _die, interval: float | None = None):
        super().__init__(name="jaxgpt-peer-watchdog", daemon=True)
        self.client, self.me, self.n, self.timeout = client, process_id, num_processes, timeout
        self.on_dead = on_dead
        self.interval = interval if interval is not None else min(5.0, max(0.2, timeout / 10))
        self._halt = threading.Event()

    def _read(self, kind: str) -> dict[int, str]:
        out = {}
        for key, value in self.client.key_value_dir_get(f"{_PREFIX}/{kind}/"):
            tail = key.rstrip("/").rsplit("/", 1)[-1]
            if tail.isdigit():
                out[int(tail)] = value
        return out

    def run(self) -> None:
        peers = [p for p in range(self.n) if p != self.me]
        seen: dict[int, str | None] = {p: None for p in peers}
        changed = {p: time.monotonic() for p in peers}
        while not self._halt.is_set():
            try:
                self.client.key_value_increment(f"{_PREFIX}/beat/{self.me}", 1)
                beats, exited = self._read("beat"), self._read("exit")
            except Exception as e:  # the coordinator (process 0) is gone
                if not self._halt.is_set():
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                    self.on_dead(f"process {self.me} lost the coordinator (process 0) [{first}]; stopping; "
                                 "restart every process with --resume RUN")
                return
            now = time.monotonic()
            for p in peers:
                if beats.get(p) != seen[p]:
                    seen[p], changed[p] = beats.get(p), now
                elif p not in exited and now - changed[p] > self.timeout:
                    self.on_dead(f"process {p} of {self.n} sent no heartbeat for {self.timeout:g} s (it died or "
                                 f"hangs); stopping process {self.me} too; restart every process with --resume RUN")
                    return
            self._halt.wait(self.interval)

    def stop(self, exited: bool = True) -> None:
        """Stop watching; with `exited`, tell the others this process is leaving on purpose."""
        self._halt.set()
        if exited:
            try:
                self.client.key_value_set(f"{_PREFIX}/exit/{self.me}", "1", True)
            except Exception:
                pass


def start_watchdog(timeout: float) -> PeerWatchdog | None:
    """Start the watchdog of this process (after `jax.distributed.initialize`); it stops, and
    marks this process as exited, when the interpreter exits normally."""
    from jax._src import distributed as jax_distributed  # the client is not public API

    client = getattr(getattr(jax_distributed, "global_state", None), "client", None)
    if client is None or not hasattr(client, "key_value_increment"):
        return None
    dog = PeerWatchdog(client, jax.process_index(), jax.process_count(), timeout)
    dog.start()
    atexit.register(dog.stop)  # runs before jax's own atexit shutdown (registered at import)
    return dog


def _only_cpu() -> bool:
    """True when no accelerator plugin is installed (checked without starting a backend)."""
    try:
        import importlib.util

        return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
    except (ImportError, ValueError):
        return True
