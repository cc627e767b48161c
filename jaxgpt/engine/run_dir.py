"""A run directory (`config.yaml`, `metrics.jsonl`, `metrics.json`, plots, `checkpoints/`)
and the process-0-only console output every task shares."""
from __future__ import annotations

import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from jaxgpt import checkpoint
from jaxgpt.config import save_config
from jaxgpt.errors import UserError


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    """One line on the console, from process 0 only (kept clear of progress bars)."""
    if is_main_process():
        tqdm.write(msg)


def default_out_dir(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """A run directory. The constructor only checks (resuming needs a checkpoint, a new run
    must not overwrite one); `create` writes, after every input has been checked."""

    def __init__(self, path: str | Path, *, resume: bool):
        self.path = Path(path)
        self.resume = resume
        if resume:
            if checkpoint.latest_step(self.path) is None:
                raise UserError(f"--resume {self.path}: no checkpoint there to resume from")
        elif checkpoint.latest_step(self.path) is not None:
            raise UserError(
                f"{self.path} already holds a run; pass --resume {self.path} to continue it "
                "or choose another --out"
            )

    def create(self, cfg) -> None:
        """Write config.yaml; a fresh run clears the metrics.jsonl a run stopped before its
        first checkpoint left behind."""
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.path / "config.yaml")
            if not self.resume:
                self.metrics_jsonl.unlink(missing_ok=True)

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"
