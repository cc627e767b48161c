"""Orbax checkpoints of a run directory: `RUN/checkpoints/<step>/{state,meta}`.

`state` holds params, optimiser state and step (host numpy, unreplicated: Orbax cannot
save pmap's per-device arrays); `meta` is JSON with the data position and the PRNG key data
(typed keys do not round-trip through Orbax, so the raw `key_data` is stored). Orbax
writes each step into a temporary directory and renames it only when complete, so a save
interrupted mid-write is never listed as the latest step.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgpt.config import Config, load_config, read_yaml
from jaxgpt.errors import UserError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"


def checkpoint_manager(run_dir: str | Path, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    # Orbax warns on every read-only manager that the directory is read-only; that is the point.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(
            Path(run_dir).absolute() / CHECKPOINT_DIR,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
    finally:
        absl_logger.setLevel(level)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Save host-side `state` (a pytree of arrays) and JSON-able `meta` at `step`, and wait."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()


def latest_step(run_dir: str | Path) -> int | None:
    path = Path(run_dir) / CHECKPOINT_DIR
    if not path.is_dir():
        return None
    return checkpoint_manager(run_dir, read_only=True).latest_step()


def restore(run_dir: str | Path, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restore `(state, meta)`; `target` is an abstract pytree (from `jax.eval_shape`)
    giving the structure, shapes and dtypes to restore into."""
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise UserError(f"{run_dir} has no checkpoint to resume from (looked in {Path(run_dir) / CHECKPOINT_DIR})")
    manager = checkpoint_manager(run_dir, read_only=True)
    _check_shapes(manager.item_metadata(step)["state"], target, f"checkpoint {step} in {run_dir}")
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["meta"]


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


def load_params(run_dir: str | Path, config_cls=Config) -> tuple[Any, Any]:
    """`(config, params)` from the latest checkpoint of a run, for inference or as `--init`.

    Sections of the run's config.yaml that `config_cls` lacks (a fine-tuning task's own
    settings) are skipped, so any run can be loaded as a `Config` whose `.model` is exact.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a jaxgpt run directory (no {CONFIG_FILE})")
    known = {f.name for f in dataclasses.fields(config_cls)}
    sections = {k: v for k, v in read_yaml(path).items() if k in known}
    cfg = load_config(None, cls=config_cls, base=sections)
    step = latest_step(run_dir)
    if step is None:
        raise UserError(f"{run_dir} has no checkpoint (looked in {run_dir / CHECKPOINT_DIR})")
    manager = checkpoint_manager(run_dir, read_only=True)
    # No target: Orbax restores the saved tree as it was written (host arrays).
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return cfg, state["params"]
