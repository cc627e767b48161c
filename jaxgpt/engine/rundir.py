"""A run directory (`config.yaml`, `metrics.jsonl`, `metrics.json`, plots, `checkpoints/`)
and its safety: no non-finite checkpoint, one metrics line per step, no user folder taken
over, one run per directory at a time.

The driver (`jaxgpt.engine.driver`) and the loop call these at fixed points:

    RunDir(out, resume=...)                before anything is written (check_new_run_dir for a new --out)
    with RunLock(run_dir): ...             around the whole run (process 0), before restore
    RunDir.create(cfg)                     marker (mark_run) first, then config.yaml
    truncate_metrics(metrics, step)        on --resume, once the restored step is known
    check_free_space(path, size, keep)     before the first step: room for keep + 1 checkpoints?
    guard.record(loss); guard.check(...)   every update; at every log record and checkpoint save
    RunDir.remove_temporaries()            at the end of every run, error or not (and at start)

Every file is written whole or not at all (`jaxgpt.io.files.atomic_write`), and the lock
file goes with the lock, so an error exit leaves no `.lock` and no temporary behind.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Sequence

from jaxgpt.errors import UserError
from jaxgpt.io.files import atomic_write, disk_full_as, is_temporary, write_via_temporary
from jaxgpt.text.tokenizer import TOKENIZER_FILES

MARKER = ".jaxgpt-run"
LOCK = ".lock"


def pin_data(cfg):
    """`cfg` whose `hf:` data.path names the commit, subset and split it was read from
    (`jaxgpt.data.hub_datasets.pinned`): `--resume` on any machine, after the data set has moved
    on, reads the same records."""
    import dataclasses

    from jaxgpt.data.hub_datasets import pinned

    data = getattr(cfg, "data", None)
    path = getattr(data, "path", None)
    if not isinstance(path, str) or pinned(path) == path:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(data, path=pinned(path)))


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def log(msg: str) -> None:
    """One line on the console, from process 0 only (kept clear of progress bars)."""
    if is_main_process():
        from tqdm.auto import tqdm

        tqdm.write(msg)


TOKENIZER_DIR = "tokenizer"  # a run's copy of its model's tokenizer files (`model.tokenizer: tokenizer`)


def warn(msg: str) -> None:
    """`warning: msg` on stderr, from process 0 only (kept clear of progress bars)."""
    if is_main_process():
        import sys

        from tqdm.auto import tqdm

        tqdm.write(f"warning: {msg}", file=sys.stderr)


def default_out_dir(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """A run directory. The constructor only checks (resuming needs a checkpoint; a new run
    must not overwrite one, nor take over a folder that is not a run of ours); `create`
    writes, after every input has been checked."""

    def __init__(self, path: str | Path, *, resume: bool):
        from jaxgpt.io import checkpoint

        self.path = Path(path)
        self.resume = resume
        if resume:
            if checkpoint.latest_step(self.path) is None:
                raise UserError(f"--resume {self.path}: no checkpoint there to resume from")
            return
        check_new_run_dir(self.path)
        if checkpoint.latest_step(self.path) is not None:
            raise UserError(f"{self.path} already holds a run; pass --resume {self.path} to continue it "
                            "or choose another --out")

    def create(self, cfg) -> None:
        """The marker, the model's tokenizer files (`RUN/tokenizer/`, unless GPT-2's), then
        config.yaml (a hub data set's `data.path` pinned to the commit it was read from); a fresh
        run clears the metrics.jsonl that a run stopped before its first checkpoint left behind."""
        from jaxgpt.config import save_config

        if is_main_process():
            with disk_full_as("the run directory", self.path):
                self.path.mkdir(parents=True, exist_ok=True)
            mark_run(self.path)
            save_config(pin_data(self.keep_tokenizer(cfg)), self.path / "config.yaml")
            if not self.resume:
                self.metrics_jsonl.unlink(missing_ok=True)

    def remove_temporaries(self) -> list[Path]:
        """Remove the temporaries of interrupted writes (`.NAME.tmp-PID`, in the run folder and
        its checkpoint steps; Orbax's are `jaxgpt.io.checkpoint.tidy`'s). Process 0 only."""
        removed: list[Path] = []
        if not is_main_process() or not self.path.is_dir():
            return removed
        folders = [self.path] + [p for p in (self.path / "checkpoints").glob("*") if p.is_dir()]
        for folder in folders:
            for p in folder.iterdir():
                if is_temporary(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def keep_tokenizer(self, cfg):
        """`cfg` whose `model.tokenizer` folder has been copied into the run (`RUN/tokenizer`, the
        config naming it relative to the run), so the run outlives the folder it came from."""
        import dataclasses
        import shutil

        folder = cfg.model.tokenizer
        if folder == "gpt2":
            return cfg
        target = self.path / TOKENIZER_DIR
        if Path(folder).resolve() != target.resolve():
            target.mkdir(exist_ok=True)
            for name in TOKENIZER_FILES:
                if (Path(folder) / name).is_file():
                    write_via_temporary(target / name,
                                        lambda tmp, src=Path(folder) / name: shutil.copyfile(src, tmp))
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer=TOKENIZER_DIR))

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"


# ---------------------------------------------------------------------------------------
# Never save non-finite state


def _global_norm(tree: Any) -> float:
    """The params' global L2 norm, one jitted reduction (inf/nan if any entry is)."""
    import jax
    import optax

    global _norm_fn
    if _norm_fn is None:
        _norm_fn = jax.jit(optax.tree.norm)
    return float(_norm_fn(tree))


_norm_fn = None


def check_finite_before_save(step: int, losses: Sequence[Any], params: Any = None, *,
                             last_saved: int | None = None, unit: str = "step") -> None:
    """Refuse to checkpoint diverged state: `UserError` naming the first bad step.

    losses: the train losses of the updates since the previous save, in order (jax scalars
    or floats), the last being update `step`; params: the state about to be saved (any
    pytree; replicated arrays are fine, finiteness does not depend on replicas).
    Called by the loops just before `checkpoint.save`, so the last good checkpoint stays
    the latest and is never rotated out by a bad one.
    """
    import numpy as np

    values = np.asarray([float(v) for v in _fetch(losses)], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    good = (f"the last good checkpoint is {unit} {last_saved}" if last_saved is not None
            else "no checkpoint was written")
    if bad.size:
        first = step - len(values) + 1 + int(bad[0])
        raise UserError(f"training diverged: train loss is {values[bad[0]]} at {unit} {first}; not saving {unit} "
                        f"{step} ({good}); lower train.lr or raise train.warmup_steps, then --resume")
    if params is not None:
        norm = _global_norm(params)
        if not math.isfinite(norm):
            raise UserError(f"training diverged: the params' global norm is {norm} at {unit} {step}; not saving it "
                            f"({good}); lower train.lr or raise train.warmup_steps, then --resume")


def _fetch(values: Sequence[Any]) -> list:
    import jax

    return list(jax.device_get(list(values)))


class DivergenceGuard:
    """The losses since the last save, checked before the next one (`check_finite_before_save`).

    `record(loss)` after every update (no device sync: the scalars are fetched at `check`);
    `check(step, params)` right before saving `step`; `saved(step)` right after.
    """

    def __init__(self, last_saved: int | None = None, unit: str = "step"):
        self.losses: list[Any] = []
        self.last_saved, self.unit = last_saved, unit

    def record(self, loss: Any) -> None:
        self.losses.append(loss)

    def check(self, step: int, params: Any = None) -> None:
        check_finite_before_save(step, self.losses, params, last_saved=self.last_saved, unit=self.unit)

    def saved(self, step: int) -> None:
        self.losses, self.last_saved = [], step


# ---------------------------------------------------------------------------------------
# Metrics: one record per step after a crash


def truncate_metrics(path: str | Path, step: int, key: str = "step") -> int:
    """Drop the JSONL records whose `key` is past `step` (and torn, unparseable lines), by an
    atomic rewrite; returns how many were dropped. Call on --resume once the restored step is
    known (RL loops: `key="iteration"` and the restored iteration), so steps logged after the
    last checkpoint of a killed run are not recorded twice. Records without `key` stay."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut short by the kill
            continue
        if isinstance(record, dict) and isinstance(record.get(key), (int, float)) and record[key] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write(path, "".join(line + "\n" for line in kept))
    return dropped


# ---------------------------------------------------------------------------------------
# --out: never take over a folder that is not ours


def mark_run(run_dir: str | Path) -> None:
    """Write the marker that makes `run_dir` recognisably a jaxgpt run (the first file a new
    run writes, so a run killed before its first checkpoint is still known as ours)."""
    path = Path(run_dir) / MARKER
    if not path.exists():
        atomic_write(path, "jaxgpt run directory\n")


def is_our_run(run_dir: str | Path) -> bool:
    """A jaxgpt run: it holds our marker, or (runs from before the marker) config.yaml
    beside a checkpoints/ folder."""
    path = Path(run_dir)
    return (path / MARKER).is_file() or ((path / "config.yaml").is_file() and (path / "checkpoints").is_dir())


def check_new_run_dir(out: str | Path) -> Path:
    """`--out` of a new run: absent, an empty folder, or a jaxgpt run (the loop then says
    to --resume it); anything else is a one-line `UserError` and nothing is touched."""
    path = Path(out)
    if not path.exists():
        return path
    if not path.is_dir():
        raise UserError(f"--out {out} is a file; give a new or empty folder")
    if is_our_run(path) or not any(path.iterdir()):
        return path
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise UserError(f"--out {out} already holds files that are not a jaxgpt run ({shown}); "
                    "give a new or empty folder")


# ---------------------------------------------------------------------------------------
# Room for the checkpoints


def free_bytes(path: str | Path) -> int:
    """Free bytes for this user on the filesystem of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_free_space(path: str | Path, checkpoint_bytes: int, keep: int, existing: int = 0) -> str | None:
    """Before the first step: the run folder's filesystem needs room for `keep + 1`
    checkpoints of `checkpoint_bytes` (rotation removes the oldest only once the newest is
    whole), less the `existing` ones already there. Less than that is a warning (returned
    and printed: the run may end or space be freed first); less than the next single
    checkpoint is a `UserError`, since the first save would fail."""
    try:
        free = free_bytes(path)
    except OSError:  # a filesystem that does not say: nothing to check against
        return None
    needed = max(1, keep + 1 - existing) * checkpoint_bytes
    if free >= needed:
        return None
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**27 else f"{b / 2**20:.1f} MiB"
    if free < checkpoint_bytes:
        raise UserError(f"{path}: {gib(free)} free, but one checkpoint takes about {gib(checkpoint_bytes)}; free "
                        "space or choose another --out")
    msg = (f"{path} has {gib(free)} free, less than the {gib(needed)} that "
           f"{max(1, keep + 1 - existing)} more checkpoint(s) of about {gib(checkpoint_bytes)} need "
           f"(train.keep_checkpoints={keep}, plus the one being written); the run stops with a one-line error if the disk fills")
    warn(msg)
    return msg


# ---------------------------------------------------------------------------------------
# One run per directory


class RunLock:
    """An exclusive `fcntl.flock` on `RUN/.lock` (holding pid and host) for the run's lifetime.

    The kernel releases it when the process exits, however it dies, so a killed run leaves
    no stale lock; a second run on the same directory gets a one-line `UserError`. Only
    process 0 of a multi-process run should take it (`enabled=jax.process_index() == 0`).
    The directory is created if needed (taking the lock is then the run's first write).
    `release` deletes the file (while still holding the lock; `acquire` checks that the file
    it locked is still the one at the path), and the directory too when the lock made it
    and nothing else was written: an error exit leaves nothing behind.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / LOCK
        self.enabled = enabled
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> "RunLock":
        if not self.enabled or self._fd is not None:
            return self
        if not self.path.parent.exists():
            with disk_full_as("the run directory", self.path.parent):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dir = True
        while True:
            with disk_full_as("the run lock", self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                                "finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder deleted it as we opened it: lock the new one
        try:
            os.ftruncate(fd, 0)
            with disk_full_as("the run lock", self.path):
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except BaseException:
            self._fd = fd
            self.release()
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
            if self._made_dir:
                try:
                    self.path.parent.rmdir()  # only when empty: the lock was all this run wrote
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
