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
collective for gloo's or JAX's much longer timeouts. JAX's own heartbeat check (which aborts
the process with a C++ stack trace, exit 134) is set to fire well after it:
`heartbeat_timeout_seconds` = max(100, 2 x peer_timeout + 30). A process that exits says
so first, so the others stop watching it, and keeps watching the others until it is gone
(JAX's shutdown barrier at exit would otherwise wait for a dead peer). A process that
leaves with an error (`leave`) skips that barrier and says nothing to the others, whose
watchdogs (or failed collectives) then stop them. Every process resumes with `--resume RUN`.

Stopping together (`StopSync`): a Ctrl-C or SIGTERM reaches one process, but every process
must stop after the same iteration and save the same step. The signalled process posts a
notice in the key-value store; each process's `StopSync` thread, on seeing it, posts the
last iteration its loop has finished (holding a lock that keeps its loop from finishing
another meanwhile), waits for everyone's, and sets the stop iteration to the largest + 1.
Lockstep collectives keep processes within one iteration of each other, so no process has
passed it; the loops stop there (`reached`), save, and exit. This is the protocol of
JAX's preemption sync manager (`multihost_utils.reached_preemption_sync_point`, which
MaxText and Orbax use), done in Python so that it also covers Ctrl-C, a notice that arrives
before the loop starts, and resumed runs; JAX's own (a C++ SIGTERM handler) is switched off.
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
    try:
        jax.config.update("jax_enable_preemption_service", False)  # StopSync handles SIGTERM (module doc)
    except Exception:  # a JAX without the option: our handler replaces its C++ one when the run starts
        pass
    heartbeat = heartbeat_timeout(timeout)
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat)
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    if jax.process_count() > 1:
        start_watchdog(timeout)
    return jax.process_count() > 1


def heartbeat_timeout(peer_timeout: float) -> int:
    """JAX's coordination-service heartbeat timeout: well past the watchdog's, so a dead peer
    is reported by the watchdog's one line, not by JAX's abort."""
    return int(max(100, 2 * peer_timeout + 30))


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


_leaving = threading.Lock()  # the first thread to leave says why; the others wait for the exit
_run = "RUN"  # the run directory, for the messages (set by the driver)
_exit_code = 0  # what this process exits with once its work is done (set by the entry point)


def set_run(path) -> str:
    """Name the run directory in the watchdog's messages (`--resume PATH`); returns the
    previous name."""
    global _run
    previous, _run = _run, str(path)
    return previous


def set_exit_code(code: int) -> None:
    """The code this process exits with after a normal end (0, or 130/143 after a stop that
    every process made): kept if a peer dies while this one is exiting."""
    global _exit_code
    _exit_code = code


def _die(msg: str) -> None:
    """One line on stderr, then exit 2 at once: the main thread may be stuck in a collective."""
    leave(2, f"\nerror: {msg}")  # on its own line, after any progress bar


def _gone(msg: str) -> None:
    """A peer died while this process was exiting after its work was done: say so, exit with
    the code it was exiting with (not waiting for the dead peer in JAX's shutdown barrier)."""
    leave(_exit_code, f"warning: {msg}")


def leave(code: int, line: str | None = None) -> None:
    """Exit now with `code`, after `line` on stderr, skipping JAX's shutdown barrier (which
    waits for every process, dead or not) and the atexit goodbye (peers must notice that
    this process is gone). For error exits of a multi-process run; one line per process."""
    _leaving.acquire()
    try:
        if line is not None:
            sys.stderr.write(line.rstrip("\n") + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def is_multiprocess() -> bool:
    """True once `jax.distributed` runs more than one process (checked without starting a backend)."""
    from jax._src import distributed as jax_distributed

    state = getattr(jax_distributed, "global_state", None)
    return getattr(state, "client", None) is not None and getattr(state, "num_processes", 1) > 1


class PeerWatchdog(threading.Thread):
    """Heartbeats through the coordination service's key-value store (see the module doc).

    `client` needs `key_value_increment(key, n)`, `key_value_dir_get(prefix)` and
    `key_value_set(key, value, allow_overwrite)` (jax's DistributedRuntimeClient); `on_dead`
    gets the one-line message (default: print it and exit 2). Counters, not clocks, are
    compared, so hosts need no synchronised time.
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout: float,
                 on_dead: Callable[[str], None] = _die, interval: float | None = None,
                 on_gone: Callable[[str], None] = _gone):
        super().__init__(name="jaxgpt-peer-watchdog", daemon=True)
        self.client, self.me, self.n, self.timeout = client, process_id, num_processes, timeout
        self.on_dead, self.on_gone = on_dead, on_gone
        self.interval = interval if interval is not None else min(5.0, max(0.2, timeout / 10))
        self._halt = threading.Event()
        self._leaving = threading.Event()

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
                if not self._leaving.is_set():
                    self.client.key_value_increment(f"{_PREFIX}/beat/{self.me}", 1)
                beats, exited = self._read("beat"), self._read("exit")
            except Exception as e:  # the coordinator (process 0) is gone
                if not self._halt.is_set() and not self._leaving.is_set():
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                    self.on_dead(f"process {self.me} lost the coordinator (process 0) [{first}]; stopping; "
                                 f"restart every process with --resume {_run}")
                return
            now = time.monotonic()
            for p in peers:
                if beats.get(p) != seen[p]:
                    seen[p], changed[p] = beats.get(p), now
                elif p not in exited and now - changed[p] > self.timeout:
                    if self._leaving.is_set():
                        self.on_gone(f"process {p} of {self.n} sent no heartbeat for {self.timeout:g} s while "
                                     f"process {self.me} was exiting; not waiting for it")
                    else:
                        self.on_dead(f"process {p} of {self.n} sent no heartbeat for {self.timeout:g} s (it died "
                                     f"or hangs); stopping process {self.me} too; restart every process with "
                                     f"--resume {_run}")
                    return
            self._halt.wait(self.interval)

    def stop(self, exited: bool = True) -> None:
        """Stop watching; with `exited`, tell the others this process is leaving on purpose."""
        self._halt.set()
        if exited:
            self._say_exit()

    def leaving(self) -> None:
        """At a normal exit: tell the others, stop beating, but keep watching the peers that
        have not said goodbye, so JAX's shutdown barrier never waits long for a dead one (a
        lost coordinator is then no error: process 0 may simply have finished first)."""
        self._say_exit()
        self._leaving.set()

    def _say_exit(self) -> None:
        try:
            self.client.key_value_set(f"{_PREFIX}/exit/{self.me}", "1", True)
        except Exception:
            pass


def start_watchdog(timeout: float) -> PeerWatchdog | None:
    """Start the watchdog of this process (after `jax.distributed.initialize`); at a normal
    exit it marks this process as exited and stops once JAX's shutdown is over (`_exit_cleanly`)."""
    from jax._src import distributed as jax_distributed  # the client is not public API

    client = getattr(getattr(jax_distributed, "global_state", None), "client", None)
    if client is None or not hasattr(client, "key_value_increment"):
        return None
    dog = PeerWatchdog(client, jax.process_index(), jax.process_count(), timeout)
    dog.start()
    atexit.register(_exit_cleanly, dog)  # runs before jax's own atexit shutdown (registered at import)
    return dog


def _exit_cleanly(dog: PeerWatchdog) -> None:
    """At a normal exit: say goodbye, run JAX's own exit (clear the backends, then the
    distributed shutdown barrier, which waits for every process) while the watchdog still
    watches the others (a peer that died meanwhile: `_gone`), then stop and join this
    module's threads, so none is inside a call to the client when the interpreter finalises
    (a daemon thread unwound there aborts the process: "FATAL: exception not rethrown")."""
    dog.leaving()
    if _stop_sync is not None:
        _stop_sync.halt()
    try:
        from jax._src import api as jax_api  # what jax registers at import; a no-op when run again

        jax_api.clean_up()
    except Exception:
        try:
            jax.distributed.shutdown()
        except Exception:
            pass
    dog.stop(exited=False)
    dog.join(dog.interval + 5)
    if _stop_sync is not None:
        _stop_sync.join(5)


# ---------------------------------------------------------------------------------------
# Stopping every process at the same iteration (see the module docstring)

_STOP = "jaxgpt/stop"
_stop_sync: "StopSync | None" = None


class StopSync:
    """The stop agreement of one process (`client`: jax's DistributedRuntimeClient, or any
    object with `key_value_set`, `key_value_try_get` and `blocking_key_value_get`).

    `notify(signum)` when this process is asked to stop (from a signal handler: it only
    posts and wakes the thread); `begin(iteration)` when the loop starts; `reached(i)` after
    each finished iteration `i`: True at the agreed one. `notice` is `(signum, process)` of
    the first request, `target` the agreed iteration, once known.
    """

    def __init__(self, client, process_id: int, num_processes: int, poll: float = 0.5,
                 wait_s: float = 1800.0):
        self.client, self.me, self.n, self.poll, self.wait_s = client, process_id, num_processes, poll, wait_s
        self.notice: tuple[int, int] | None = None
        self.target: int | None = None
        self._last: int | None = None  # the last iteration the loop finished (or began at)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxgpt-stop-sync", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        """Stop watching (at exit)."""
        self._halt.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def notify(self, signum: int) -> None:
        try:  # the first notice wins (no overwrite), so every process reads the same one
            self.client.key_value_set(f"{_STOP}/notice", f"{signum}:{self.me}", False)
        except Exception:
            pass  # another process's notice came first, or the coordinator is gone (the watchdog says so)
        self._wake.set()

    def begin(self, iteration: int) -> None:
        with self._lock:
            self._last = iteration
        self._wake.set()

    def reached(self, iteration: int) -> bool:
        with self._lock:  # blocks while the thread agrees on the target
            self._last = iteration
            return self.target is not None and iteration >= self.target

    def _try_get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception:  # not there (yet), or the coordinator is gone
            return None

    def _watch(self) -> None:
        while not self._halt.is_set():
            self._wake.wait(self.poll)
            self._wake.clear()
            if self._halt.is_set():
                return
            notice = self._try_get(f"{_STOP}/notice")
            if notice is None or self._last is None:
                continue
            with self._lock:
                try:
                    self.client.key_value_set(f"{_STOP}/at/{self.me}", str(self._last), True)
                    lasts = [int(self.client.blocking_key_value_get(f"{_STOP}/at/{p}", int(self.wait_s * 1000)))
                             for p in range(self.n)]
                except Exception:  # a peer never answered: it is dead (the watchdog stops this one)
                    return
                signum, _, sender = notice.partition(":")
                self.notice = (int(signum), int(sender or 0))
                self.target = max(lasts) + 1
            return


def stop_sync() -> StopSync | None:
    """This process's `StopSync` in a multi-process run (created on first use), else None."""
    global _stop_sync
    if _stop_sync is None and is_multiprocess():
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
        if all(hasattr(client, m) for m in ("key_value_set", "key_value_try_get", "blocking_key_value_get")):
            _stop_sync = StopSync(client, jax.process_index(), jax.process_count())
    return _stop_sync


def _only_cpu() -> bool:
    """True when no accelerator plugin is installed (checked without starting a backend)."""
    try:
        import importlib.util

        return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
    except (ImportError, ValueError):
        return True
