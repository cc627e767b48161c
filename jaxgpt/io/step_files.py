"""What a checkpoint step folder holds and whether it is whole: manifests (written last, so a
step is trusted only once complete), verification, steps cut short, and removal through a
trash folder (a rename first, so nothing half-deleted ever looks like a step).

    RUN/checkpoints/<step>/{state, meta, manifest.json}     a step (`jaxgpt.io.checkpoint` saves it)
    RUN/checkpoints/<step>.orbax-checkpoint-tmp*            Orbax still writing it
    RUN/checkpoints/.deleting/                              steps being removed
    RUN/corrupt-checkpoints/<step>-<time>                   damaged or incomplete steps, moved aside
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax

from jaxgpt.io.files import atomic_write

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt-checkpoints"
MANIFEST = "manifest.json"
TRASH_DIR = ".deleting"  # under checkpoints/: steps being removed (renamed here first, then deleted)
ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax's suffix for a step (or item) still being written


def warn(msg: str) -> None:
    if jax.process_index() == 0:
        from tqdm.auto import tqdm

        tqdm.write(f"warning: {msg}", file=sys.stderr)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _step_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path, step: int) -> None:
    """`step_dir/manifest.json`: {relative path: {size, sha256}} of every file, written to a
    temporary name and renamed, so a manifest is whole or absent."""
    files = {p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _step_files(step_dir)}
    atomic_write(step_dir / MANIFEST, json.dumps({"format": 1, "step": step, "files": files}, indent=1),
                 what=f"the manifest of checkpoint step {step}")


def verify_step(step_dir: Path, hashes: bool = True) -> str | None:
    """None if the step's files match its manifest (or it has none: saved before manifests),
    else what is wrong, in a few words; `hashes=False` checks only presence and sizes."""
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for rel, want in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{rel} is {size} bytes, {want['size']} when saved"
    for rel, want in files.items() if hashes else ():  # sizes first: they are cheap and catch truncation
        if _sha256(step_dir / rel) != want["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def remove_partial(directory: Path, step: int) -> None:
    """What a failed save of `step` left: Orbax's temporary folder, or the committed step
    whose manifest could not be written (never trusted as a checkpoint)."""
    for tmp in directory.glob(f"{step}{ORBAX_TMP}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    step_dir = directory / str(step)
    if step_dir.is_dir() and not (step_dir / MANIFEST).is_file():
        discard(step_dir)


def discard(path: Path) -> None:
    """Rename `path` into the trash (atomic: it stops looking like a step at once), then
    delete it; a kill in between leaves only the trash, which `tidy` empties."""
    trash = path.parent / TRASH_DIR
    trash.mkdir(exist_ok=True)
    os.replace(path, trash / f"{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    empty_trash(path.parent)


def empty_trash(directory: Path) -> None:
    trash = directory / TRASH_DIR
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)


def incomplete(step_dir: Path) -> str | None:
    """Why a step folder is structurally not a checkpoint (what a cut-short deletion or copy
    leaves), or None. Damage inside files (sizes, hashes) is `verify_step`'s, at restore."""
    if not any(step_dir.iterdir()):
        return "it is empty"
    manifest = step_dir / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable manifest is damage: restore reports it
        missing = [rel for rel in listed if not (step_dir / rel).is_file()]
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") \
            if missing else None
    for item in ("state", "meta"):
        if not (step_dir / item).is_dir():
            return f"its {item} is missing"
    return None


def step_dirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def tidy(run_dir: str | Path) -> None:
    """Before a resumed run lists its steps (every process calls it; process 0 acts, then all
    meet): remove Orbax's temporary folders and the trash that a killed save or rotation left,
    and move structurally incomplete steps (`incomplete`) to `RUN/corrupt-checkpoints/` with
    one warning line, so they are never counted as checkpoints (nor by `keep_checkpoints`)."""
    run_dir = Path(run_dir)
    directory = run_dir / CHECKPOINT_DIR
    if jax.process_index() == 0 and directory.is_dir():
        for p in directory.iterdir():
            if ORBAX_TMP in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        empty_trash(directory)
        broken = {int(p.name): reason for p in step_dirs(directory) if (reason := incomplete(p))}
        if broken:
            dest = run_dir / CORRUPT_DIR
            dest.mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for s in broken:
                os.replace(directory / str(s), dest / f"{s}-{stamp}")
            what = "; ".join(f"step {s}: {r}" for s, r in broken.items())
            warn(f"{len(broken)} incomplete checkpoint folder(s) in {directory} ({what}: a save or deletion was "
                  f"cut short); moved to {dest}, not used")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxgpt-checkpoint-tidy")


def newest_intact_step(run_dir: str | Path) -> int | None:
    """The newest step that is complete and whose files have their manifest's sizes (no
    hashing: for messages, e.g. after a full disk); None when there is none."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    for p in reversed(step_dirs(directory)):
        if incomplete(p) is None and verify_step(p, hashes=False) is None:
            return int(p.name)
    return None


__all__ = ["CHECKPOINT_DIR", "CORRUPT_DIR", "MANIFEST", "ORBAX_TMP", "TRASH_DIR", "discard", "empty_trash", "incomplete",
           "newest_intact_step", "remove_partial", "step_dirs", "tidy", "verify_step", "warn", "write_manifest"]
