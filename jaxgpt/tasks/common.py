"""What every fine-tuning task shares: the config base, CLI flags, and `SplitTask`, the
recipe of supervised fine-tuning on train / val / test splits (classify, instruct, reward,
DPO). RL tasks build on `jaxgpt.rl.common.RLTask`.

A task's config subclasses `TaskConfig` (the sections every task has):

    model     ModelConfig (from --init SPEC when given: the checkpoint's shape)
    data      the task's data section (a subclass replaces the field's type)
    train     FinetuneTrainConfig: TrainConfig + `epochs`
    lora      LoRAConfig (used when finetune.train_mode is lora)
    finetune  FinetuneConfig: `init` and `train_mode` (`jaxgpt.engine.params`)
    mesh      MeshConfig: pmap replicas (default) or a sharded (data, fsdp, tensor) mesh

loaded like `train.py`'s (defaults <- task YAML <- --model-config FILE's model section <-
--set), written to RUN/config.yaml, and reloaded from there by `--resume RUN`. Flags are
shorthands for config keys: `--init SPEC` is `--set finetune.init=SPEC`, `--train-mode M`
is `finetune.train_mode=M`, `--data X` is `data.path=X`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from jaxgpt.config import TRAIN_MODES, MeshConfig, ModelConfig, TrainConfig, load_config, validate
from jaxgpt.engine import Plot, Recipe, Schedule, log
from jaxgpt.engine.loop import Throughput
from jaxgpt.errors import UserError
from jaxgpt.models.lora import LoRAConfig, has_lora, merge_lora, validate_lora

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FinetuneTrainConfig(TrainConfig):
    """`train` section of fine-tuning: TrainConfig plus epochs.

    epochs > 0: train that many passes over the training set (incomplete last batch dropped),
    evaluating at the end of each epoch; `max_steps` and `eval_interval` are then unused.
    epochs = 0: train `max_steps` updates (RL: iterations), evaluating every `eval_interval`.
    """

    epochs: int = 5


@dataclass(frozen=True)
class FinetuneConfig:
    """`finetune` section: where the weights start and which of them train."""

    init: str = ""  # --init SPEC: run dir, HF GPT-2 dir, OpenAI dir or preset (gpt2, ...); "" = random init
    train_mode: str = "full"  # full | last-block | lora


@dataclass(frozen=True)
class TaskConfig:
    """The sections every fine-tuning task's config has; a task subclasses it, giving `data`
    its own section type (and `lora` other default targets) and adding its own sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = None
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


def validate_finetune(cfg) -> None:
    """Checks on the shared sections beyond `jaxgpt.config.validate` (called by `jaxgpt.cli.common.load_task_config`)."""
    validate(cfg)
    mode = cfg.finetune.train_mode
    if mode not in TRAIN_MODES:
        raise UserError(f"unknown train mode {mode!r} (--train-mode / finetune.train_mode); "
                        f"choose one of {', '.join(TRAIN_MODES)}")
    if cfg.train.epochs < 0:
        raise UserError(f"train.epochs must be >= 0, got {cfg.train.epochs}")
    validate_lora(cfg.lora)


def schedule_steps(cfg, steps_per_epoch: int) -> tuple[int, int]:
    """(iterations, eval interval) for `train.epochs` / `train.max_steps`."""
    t = cfg.train
    if t.epochs > 0:
        return t.epochs * steps_per_epoch, steps_per_epoch
    return t.max_steps, t.eval_interval


# ---------------------------------------------------------------------------------------
# Supervised fine-tuning on splits


class SplitTask(Recipe):
    """Supervised fine-tuning on the data's train / val / test splits, counted in epochs.

    The data (`self.data`, from `load_data`) has `splits[name]` (sized), `steps_per_epoch(B)`,
    `train_batch(step, B)` and `eval_batches(split, B, max_batches)`. Evaluations are exact
    means over whole splits (`DataParallel.evaluate`), named `{split}_loss` (the train
    split's `train_eval_loss`: dropout off, unlike the running `train_loss` of the updates)
    and `{split}_<name>` for each `split_metrics` sum. At each epoch end: `loop_splits`
    (capped by `train.eval_batches`); before training: `before_splits` (whole; the
    step-0 record and metrics.json's `*_before`); at the end: `final_splits` (whole).
    """

    split_metrics: ClassVar[dict[str, str]] = {}
    loop_splits: ClassVar[tuple[str, ...]] = ("train", "val")
    before_splits: ClassVar[tuple[str, ...]] = ()
    final_splits: ClassVar[tuple[str, ...]] = SPLITS
    batch_keys: ClassVar[tuple[str, ...] | None] = None  # the batch keys the loss reads (None: all)
    examples: ClassVar[str] = "examples"  # what a row of the data is, for messages
    log_before = True

    @property
    def batch_size(self) -> int:
        return self.cfg.train.batch_size

    def validate(self) -> None:
        self.dp.check_batch_size(self.batch_size, self.cfg.train.grad_accum_steps)

    def schedule(self) -> Schedule:
        per_epoch = self.data.steps_per_epoch(self.batch_size)
        if per_epoch == 0:
            raise UserError(f"train.batch_size={self.batch_size} is larger than the training split "
                            f"({len(self.data.splits['train'])} {self.examples}); lower train.batch_size")
        iterations, eval_interval = schedule_steps(self.cfg, per_epoch)
        return Schedule(iterations, eval_interval, steps_per_epoch=per_epoch)

    def describe(self) -> str:
        return f"data: {self.data.describe()}"

    def select(self, batch: dict) -> dict:
        return batch if self.batch_keys is None else {k: batch[k] for k in self.batch_keys if k in batch}

    def source(self, iteration, local_params):
        return [self.select(self.data.train_batch(iteration, self.batch_size))], {}

    def epoch(self, step: int) -> float:
        return round(step / self.data.steps_per_epoch(self.batch_size), 4)

    def evaluate_split(self, placed, split: str, max_batches: int = 0) -> dict:
        if not len(self.data.splits[split]):
            return {}
        batches = (self.select(b) for b in self.data.eval_batches(split, self.batch_size, max_batches))
        out = self.dp.evaluate(self.p_eval, placed.params, batches)
        if not out:
            return {}
        loss_key = "train_eval_loss" if split == "train" else f"{split}_loss"
        return {loss_key: out["loss"], **{f"{split}_{name}": out[k] for k, name in self.split_metrics.items()}}

    def evaluate_splits(self, placed, splits, max_batches: int = 0) -> dict:
        return {k: v for split in splits for k, v in self.evaluate_split(placed, split, max_batches).items()}

    def evaluate(self, placed) -> dict:
        out = {"epoch": self.epoch(placed.step),
               **self.evaluate_splits(placed, self.loop_splits, self.cfg.train.eval_batches)}
        log(f"epoch {out['epoch']:.2f} (step {placed.step}): "
            + " | ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "epoch"))
        return out

    def evaluate_before(self, placed) -> dict | None:
        return self.evaluate_splits(placed, self.before_splits) if self.before_splits else None

    def final(self, loop) -> dict:
        return self.evaluate_splits(loop.placed, self.final_splits)

    def summary(self, loop, before: dict, final: dict) -> dict:
        return {"epoch": self.epoch(loop.step), "train_mode": self.cfg.finetune.train_mode,
                "init": self.cfg.finetune.init, "train_loss": loop.last_record.get("train_loss"),
                **{f"{k}_before": v for k, v in before.items()}, **final,
                "num_examples": {s: len(self.data.splits[s]) for s in SPLITS}}

    def done_line(self, summary: dict) -> str:
        shown = [k for k in summary if k.endswith(("_accuracy", "_margin_after", "_rougeL_f1")) or k == "val_loss"]
        return " | ".join(f"{k} {summary[k]:.4f}" for k in shown if isinstance(summary[k], float))

    def throughput_of(self, tokens_per_example: int) -> Throughput:
        return Throughput(tokens_per_iteration=self.batch_size * tokens_per_example)


PAIR_PLOTS = (Plot("loss.png", "step", ("train_loss", "train_eval_loss", "val_loss"), "loss"),)


# ---------------------------------------------------------------------------------------
# Loading a finished fine-tuning run (for prediction, evaluation, or as --init)


def load_run(run_dir: str | Path, cls, *, merge: bool = True) -> tuple[Any, Any]:
    """`(cfg, params)` of a fine-tuning run's latest checkpoint; LoRA adapters merged."""
    from jaxgpt.io import checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a jaxgpt run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", cls=cls)
    if checkpoint.latest_step(run_dir) is None:
        raise UserError(f"{run_dir} has no checkpoint (looked in {run_dir / checkpoint.CHECKPOINT_DIR})")
    _, params = checkpoint.load_params(run_dir, config_cls=cls)
    if merge and has_lora(params):
        params = merge_lora(params, cfg.lora)
    return cfg, params


__all__ = ["FinetuneConfig", "FinetuneTrainConfig", "PAIR_PLOTS", "SPLITS", "SplitTask",
           "TaskConfig", "load_run", "schedule_steps",
           "validate_finetune"]
