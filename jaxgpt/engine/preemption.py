"""Stopping a run on request: Ctrl-C (SIGINT) and preemption notices (SIGTERM).

Cloud VMs, spot instances, SLURM and Kubernetes preempt a job with SIGTERM and kill it
(SIGKILL) a grace period later. Within a run (`StopRequests`, installed by the driver):

    first SIGTERM / Ctrl-C     noted; the loop finishes the iteration in progress, saves a
                               checkpoint, prints one line and the command exits with 143
                               (SIGTERM) or 130 (Ctrl-C): `EXIT_CODES`
    multi-process              every process stops after the same iteration and saves the
                               same step (`jaxgpt.parallel.distributed.StopSync`), whichever
                               process got the signal
    a second one               stops at once (nothing more is saved), except while a
                               checkpoint is being written: the save always finishes first
                               (manifest included), then the command exits

A notice that comes before the loop's first iteration stops the run after it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
SIGNALS = tuple(EXIT_CODES)


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal; the entry points exit with `exit_code` (130 or 143) and,
    when `message` is set, print it (the loop prints its own line when it saved). `agreed`:
    every process stops here (the loop's stop after a save), so the exit is a normal one."""

    def __init__(self, signum: int, message: str = "", agreed: bool = False):
        super().__init__(message)
        self.signum, self.message, self.agreed = signum, message, agreed
        self.exit_code = EXIT_CODES.get(signum, 130)


class StopRequests:
    """Ctrl-C and SIGTERM handlers for the duration of a run (`with StopRequests(sync):`).

    sync: the multi-process agreement (`jaxgpt.parallel.distributed.StopSync`), or None.
    The loop calls `begin(iteration)` before its first iteration, `should_stop(i)` after
    each (True: save and `stopped()`), and wraps every save in `saving()`. Off the main
    thread (where Python cannot install handlers) it only ever answers False.
    """

    def __init__(self, sync=None):
        self.sync = sync
        self.signum: int | None = None  # the first signal this process received
        self._saving = 0
        self._second: int | None = None  # a second signal that came during a save
        self._previous: dict[int, object] = {}

    # -- installation -------------------------------------------------------------------
    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.sync is not None:
                self.sync.notify(signum)
            return
        if self._saving:
            self._second = self._second or signum
            return
        raise Stopped(signum, f"stopped at once by a second {signal_name(signum)}: nothing was saved after the "
                              "last checkpoint")

    # -- the loop's questions -------------------------------------------------------------
    def begin(self, iteration: int) -> None:
        if self.sync is not None:
            self.sync.begin(iteration)

    def should_stop(self, iteration: int) -> bool:
        """After iteration `iteration`: stop here (save, then `stopped()`)?"""
        if self.sync is not None:
            return self.sync.reached(iteration)
        return self.signum is not None

    @property
    def requested(self) -> int | None:
        """The signal that stops the run (multi-process: the first notice of any process)."""
        if self.sync is not None and self.sync.notice is not None:
            return self.sync.notice[0]
        return self.signum

    def describe(self, iteration: int, unit: str, resume: str) -> str:
        """The one line said when the run stops after saving `iteration`."""
        signum = self.requested or signal.SIGINT
        if self.sync is not None and self.sync.notice is not None:
            sender = self.sync.notice[1]
            how = "interrupted (Ctrl-C" if signum == signal.SIGINT else f"preempted ({signal_name(signum)}"
            return (f"{how} to process {sender}): every process saved a checkpoint at {unit} {iteration}; "
                    f"resume with --resume {resume} on every process")
        if signum == signal.SIGINT:
            return f"interrupted: saved a checkpoint at {unit} {iteration}; resume with --resume {resume}"
        return f"preempted ({signal_name(signum)}): saved a checkpoint at {unit} {iteration}; resume with --resume {resume}"

    def stopped(self) -> Stopped:
        return Stopped(self.requested or signal.SIGINT, agreed=True)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A checkpoint write: a second signal waits until it is whole, then stops the run."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
        if not self._saving and self._second is not None:
            signum, self._second = self._second, None
            raise Stopped(signum, f"stopped by a second {signal_name(signum)} once the checkpoint being written "
                                  "was complete")


__all__ = ["EXIT_CODES", "StopRequests", "Stopped", "signal_name"]
