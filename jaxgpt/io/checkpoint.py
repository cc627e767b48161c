"""Orbax checkpoints of a run directory: `RUN/checkpoints/<step>/{state,meta,manifest.json}`.

`state` holds params, optimiser state and step (host numpy, unreplicated: Orbax cannot
save pmap's per-device arrays); `meta` is JSON with the data position and the PRNG key data
(typed keys do not round-trip through Orbax, so the raw `key_data` is stored). Orbax
writes each step into a temporary directory and renames it only when complete, so a save
interrupted mid-write is never listed as the latest step.

Each step verifies itself: once Orbax has finished, `save` writes `manifest.json` (size and
sha256 of every file of the step, written last and atomically). `restore` and
`load_params` check it and, when the newest step fails the check or fails to load (a disk
that filled up, a copy cut short, an emptied file), warn in one line naming both steps and
use the newest intact one instead; with none intact they raise a one-line `UserError`.
Steps saved before manifests existed are trusted if they load. A resumed run moves the
damaged steps to `RUN/corrupt-checkpoints/`, so its next save at that step is not skipped
and `keep_checkpoints` never rotates the intact step out in favour of a damaged one.

Rotation (`keep_checkpoints`) is done here, not by Orbax, and only once the new step's
manifest is written: an old step is first renamed into `checkpoints/.deleting/` (atomic)
and only then removed, so a kill during rotation never leaves a half-deleted step that
looks like a checkpoint. A save that fails (a full disk, an error) removes what it wrote of
its step; a full disk is one `DiskFull` line. `tidy` (at every --resume) removes what a
killed save or rotation left (`*.orbax-checkpoint-tmp*`, `.deleting/`) and moves steps that
are structurally incomplete (empty, `state` without `meta`, files of the manifest missing:
runs of older versions, or a hand-deleted file) to `RUN/corrupt-checkpoints/`, with one line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgpt.config import Config, load_config, read_yaml, with_local_paths
from jaxgpt.errors import UserError
from jaxgpt.io.files import disk_full_as, is_disk_full

from jaxgpt.io.step_files import (CHECKPOINT_DIR, CORRUPT_DIR, TRASH_DIR, empty_trash, remove_partial, verify_step,
                                  warn, write_manifest)
from jaxgpt.io.step_files import newest_intact_step, tidy  # noqa: F401  (the run's checkpoints, as callers know them)

CONFIG_FILE = "config.yaml"


class RunCheckpoints(ocp.CheckpointManager):
    """Orbax's manager of `RUN/checkpoints`, keeping `keep` steps (rotated by `save`)."""

    keep: int | None = None


def checkpoint_manager(run_dir: str | Path, keep: int = 2, read_only: bool = False) -> RunCheckpoints:
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:  # no max_to_keep: `save` rotates, after the manifest, through TRASH_DIR
        options = ocp.CheckpointManagerOptions(create=True, todelete_subdir=TRASH_DIR)
    # Orbax warns on every read-only manager that the directory is read-only; that is the point.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        manager = RunCheckpoints(
            Path(run_dir).absolute() / CHECKPOINT_DIR,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
    finally:
        absl_logger.setLevel(level)
    manager.keep = None if read_only else keep
    return manager


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Save host-side `state` (a pytree of arrays) and JSON-able `meta` at `step`, wait, then
    (process 0 only: every process's files are in place once Orbax has committed the step)
    record the step's files in its manifest, and only then rotate out the steps beyond the
    manager's `keep`. On failure what was written of `step` is removed (so a step without a
    manifest is never left by this code) and a full disk raises `DiskFull`."""
    directory = Path(str(manager.directory))
    what = f"checkpoint step {step}"
    with _quiet_disk_full_logs(), disk_full_as(what, directory / str(step)):
        # A failure here may leave Orbax's threads writing the step: what they leave is
        # `tidy`'s, at the next --resume.
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
    try:
        with _quiet_disk_full_logs(), disk_full_as(what, directory / str(step)):
            manager.wait_until_finished()  # Orbax's writes are over once this returns or raises
            if jax.process_index() == 0:
                write_manifest(directory / str(step), step)
    except BaseException as e:
        # A multi-process failure other than a full disk is a peer's death: its writes may go
        # on, so the step is left to `tidy` rather than pulled from under them.
        if jax.process_index() == 0 and (jax.process_count() == 1 or is_disk_full(e)):
            remove_partial(directory, step)
            with contextlib.suppress(Exception):
                manager.reload()
        raise
    keep = getattr(manager, "keep", None)
    if keep:
        for old in sorted(manager.all_steps())[:-keep]:
            manager.delete(old)  # renamed into TRASH_DIR by process 0, then a barrier
        if jax.process_index() == 0:
            empty_trash(directory)


class _DropDiskFull(logging.Filter):
    """Orbax logs every failed async write with a traceback (hundreds of lines for one full
    disk); the error itself reaches `save`, which says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            return not (is_disk_full(record.exc_info[1]) or is_disk_full(ValueError(text)))
        return not is_disk_full(ValueError(text))


@contextlib.contextmanager
def _quiet_disk_full_logs():
    logger, dropped = logging.getLogger("absl"), _DropDiskFull()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


def estimated_size(state: Any) -> int:
    """Bytes a checkpoint of `state` takes (its arrays' global sizes; Orbax does not compress)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x)))
                   for x in jax.tree_util.tree_leaves(state) if hasattr(x, "dtype")))


# ---------------------------------------------------------------------------------------
# Finding and restoring the newest intact step


def latest_step(run_dir: str | Path) -> int | None:
    """The newest step Orbax lists (committed, not necessarily intact; `restore` checks)."""
    path = Path(run_dir) / CHECKPOINT_DIR
    if not path.is_dir():
        return None
    manager = checkpoint_manager(run_dir, read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def all_steps(run_dir: str | Path) -> list[int]:
    """Every committed step, oldest first."""
    path = Path(run_dir) / CHECKPOINT_DIR
    if not path.is_dir():
        return []
    manager = checkpoint_manager(run_dir, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _newest_intact(run_dir: Path, load: Callable[[ocp.CheckpointManager, int], Any],
                   step: int | None) -> tuple[int, Any, dict[int, str]]:
    """`(step, load(manager, step), {damaged step: reason})` for the newest step that passes
    its manifest and loads; only `step` when given. `UserError` from `load` (a checkpoint of
    another model) is not damage and propagates."""
    steps = [step] if step is not None else all_steps(run_dir)[::-1]
    if not steps:
        raise UserError(f"{run_dir} has no checkpoint (looked in {run_dir / CHECKPOINT_DIR})")
    damaged: dict[int, str] = {}
    manager = checkpoint_manager(run_dir, read_only=True)
    try:
        for s in steps:
            reason = verify_step(run_dir / CHECKPOINT_DIR / str(s))
            if reason is None:
                try:
                    return s, load(manager, s), damaged
                except UserError:
                    raise
                except Exception as e:  # Orbax / tensorstore / JSON errors of a damaged step
                    first = (str(e).splitlines() or [""])[0]
                    reason = f"it fails to load: {type(e).__name__}: {first[:120]}"
            damaged[s] = reason
    finally:
        manager.close()
    where = "; ".join(f"step {s}: {r}" for s, r in damaged.items())
    raise UserError(f"{run_dir} has no intact checkpoint ({where}); start a new run or restore the "
                    f"files from a copy")


def _report(run_dir: Path, used: int, damaged: dict[int, str], quarantine: bool) -> None:
    if damaged:
        newest = max(damaged)
        moved = f"; moved the damaged step(s) to {run_dir / CORRUPT_DIR}" if quarantine else ""
        warn(f"checkpoint {newest} of {run_dir} is damaged ({damaged[newest]}); using step {used} instead{moved}")
    if quarantine:
        _quarantine(run_dir, [s for s in damaged if s > used])


def _quarantine(run_dir: Path, steps: list[int]) -> None:
    """Move damaged steps newer than the restored one out of `checkpoints/` (process 0), so
    the resumed run saves those steps afresh and rotation ignores them. Every process then
    meets at one barrier, damage or not: a process that started late may already see the
    moved directory, and all must make the same collective calls."""
    if jax.process_index() == 0 and steps:
        dest = run_dir / CORRUPT_DIR
        dest.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s in steps:
            os.replace(run_dir / CHECKPOINT_DIR / str(s), dest / f"{s}-{stamp}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxgpt-checkpoint-quarantine")


def restore(run_dir: str | Path, target: Any, step: int | None = None, *,
            quarantine: bool = True) -> tuple[Any, dict]:
    """Restore `(state, meta)` of the newest intact step (or exactly `step`); `target` is
    an abstract pytree (from `jax.eval_shape`) giving the structure, shapes and dtypes to
    restore into. With `quarantine` (resuming), the checkpoints are first tidied (`tidy`) and
    damaged newer steps are moved aside."""
    run_dir = Path(run_dir)
    if quarantine:
        tidy(run_dir)
    # Abstract leaves keep their sharding (a mesh restores shard by shard, never gathered).
    abstract = jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)

    def load(manager, s):
        saved = manager.item_metadata(s)["state"]
        if not _path_shapes(saved):  # no readable state metadata: damage, not another model
            raise ValueError("state/_METADATA is unreadable")
        _check_shapes(saved, target, f"checkpoint {s} in {run_dir}")
        restored = manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    if step is None and latest_step(run_dir) is None:
        raise UserError(f"{run_dir} has no checkpoint to resume from (looked in {run_dir / CHECKPOINT_DIR})")
    used, (state, meta), damaged = _newest_intact(run_dir, load, step)
    _report(run_dir, used, damaged, quarantine)
    return state, meta


def _path_shapes(tree) -> dict[str, tuple]:
    def name(k):
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    leaves = jax.tree_util.tree_leaves_with_path(getattr(tree, "tree", tree))
    return {"/".join(name(k) for k in path): tuple(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape)
            for path, leaf in leaves}


def _check_shapes(saved_metadata, target, where: str) -> None:
    """Orbax would silently pad or truncate mismatched arrays: refuse instead, naming the
    first parameter that differs and both shapes."""
    saved, wanted = _path_shapes(saved_metadata), _path_shapes(target)
    for path in sorted(set(saved) | set(wanted)):
        if path not in saved:
            raise UserError(f"{where} does not match this model/optimiser: it lacks {path}")
        if path not in wanted:
            raise UserError(f"{where} does not match this model/optimiser: unexpected {path}")
        if tuple(saved[path]) != tuple(wanted[path]):
            raise UserError(
                f"{where} does not match this model/optimiser: {path} is {list(saved[path])} "
                f"in the checkpoint but {list(wanted[path])} here"
            )


def read_run_config(run_dir: str | Path, overrides=()) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a jaxgpt run directory (no {CONFIG_FILE})")
    return load_config(path, overrides)


def read_run_sections(run_dir: str | Path, config_cls=Config):
    """A run's config.yaml as `config_cls`, skipping the sections it lacks (a fine-tuning task's
    own), its paths (`model.tokenizer`) made absolute."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a jaxgpt run directory (no {CONFIG_FILE})")
    known = {f.name for f in dataclasses.fields(config_cls)}
    sections = {k: v for k, v in with_local_paths(read_yaml(path), run_dir).items() if k in known}
    return load_config(None, cls=config_cls, base=sections)


def load_params(run_dir: str | Path, config_cls=Config) -> tuple[Any, Any]:
    """`(config, params)` from the newest intact checkpoint of a run, for inference or `--init`.

    Sections of the run's config.yaml that `config_cls` lacks (a fine-tuning task's own
    settings) are skipped, so any run can be loaded as a `Config` whose `.model` is exact.
    """
    run_dir = Path(run_dir)
    cfg = read_run_sections(run_dir, config_cls)
    # Onto one device, whatever layout saved it (pmap replicas, or a mesh of other devices).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def load(manager, s):
        saved = manager.item_metadata(s)["state"]
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                          getattr(saved, "tree", saved))
        return manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    used, state, damaged = _newest_intact(run_dir, load, None)
    _report(run_dir, used, damaged, quarantine=False)  # reading a run never changes it
    return cfg, state["params"]
