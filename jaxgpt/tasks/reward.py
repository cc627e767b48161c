"""`finetune.py reward`: a reward model trained on preference pairs (Bradley-Terry).

The model is the GPT with its LM head replaced by a scalar head (`GPT(num_classes=1)`,
leaf `score/kernel [n_embd, 1]`), read at each row's last real token: the <|endoftext|>
after the response (rows are right-padded; attention is causal, so padding cannot change
it). Each pair's chosen and rejected sequences (`jaxgpt.data.preference`, the instruction
format) go through one forward pass, and the loss is `-log sigmoid(r_chosen - r_rejected)`
(`jaxgpt.preference.pairwise_loss`), through the shared `train_step` and `TrainLoop` (AdamW,
train modes full / last-block / lora, pmapped data parallelism, checkpoints, `--resume`).

Metrics: `{split}_pairwise_accuracy` (fraction of pairs scored chosen > rejected),
`{split}_loss` (`train_eval_loss` on the train split: `train_loss` is the running loss of
the updates) and `{split}_score_margin` (mean r_chosen - r_rejected), on train and val at
each epoch end and on all three splits at the end; `val_pairwise_accuracy_before` before the
first update. Run directory: config.yaml, metrics.jsonl, metrics.json, loss.png,
accuracy.png, checkpoints/.

For RL (PPO) and scoring: `load_reward_model(run)` and the pure `reward_scores(...)`;
`python -m jaxgpt.reward --init RUN --instruction ... --response ...` prints scores.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.data.preference import PreferenceDataConfig, load_preference
from jaxgpt.errors import UserError
from jaxgpt.lora import LoRAConfig
from jaxgpt.preference import pairwise_loss, preference_sums
from jaxgpt.tasks import common, default_config
from jaxgpt.tasks.common import FinetuneConfig, FinetuneTrainConfig

DEFAULT_CONFIG = default_config("reward")
BATCH_KEYS = ("chosen", "rejected", "chosen_lengths", "rejected_lengths", "weight")


@dataclass(frozen=True)
class RewardConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


CONFIG_CLASS = RewardConfig


def reward_scores(model_cfg: ModelConfig, params, tokens, lengths):
    """Scores `[b]` float32 of right-padded rows `tokens [b, t]` int32 with `lengths [b]`
    int32 real tokens each: the scalar head at position `lengths - 1` (dropout off).

    Pure and jittable (`jax.jit(reward_scores, static_argnums=0)`); `params` are plain
    (merged) reward-model params from `load_reward_model`. Rows should be scored as trained:
    `format_prompt(instruction, input) + response + <|endoftext|>`
    (`jaxgpt.data.preference.encode_example`), the end-of-text being the last real token."""
    from jaxgpt.model import GPT

    scores = GPT(model_cfg, num_classes=1).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    return common.last_token(scores, jnp.asarray(lengths, jnp.int32))[:, 0]


@dataclass(frozen=True)
class _RewardRun:
    """The sections of a reward run's config.yaml that loading its model needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def load_reward_model(run_dir: str | Path) -> tuple[ModelConfig, Any]:
    """`(model_cfg, params)` of a reward run's latest checkpoint: plain params (LoRA adapters
    merged) with a `score/kernel [n_embd, 1]` head, for `reward_scores`."""
    from jaxgpt import checkpoint
    from jaxgpt.lora import has_lora, merge_lora

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a jaxgpt run directory (no config.yaml)")
    cfg, params = checkpoint.load_params(run_dir, config_cls=_RewardRun)
    if has_lora(params):
        params = merge_lora(params, cfg.lora)
    kernel = params.get("score", {}).get("kernel") if hasattr(params, "get") else None
    if kernel is None or tuple(np.shape(kernel)) != (cfg.model.n_embd, 1):
        raise UserError(f"{run_dir} is not a reward-model run (no score head [{cfg.model.n_embd}, 1]); "
                        "train one with `python finetune.py reward`")
    return cfg.model, params


def reward_loss_fn(model):
    """`loss_fn(params, batch, dropout_key) -> (loss_sum, sums)` of the pairwise loss.

    batch: `chosen`, `rejected` `[b, t]` int32, `chosen_lengths`, `rejected_lengths` `[b]`,
    optional `weight [b]`. Chosen and rejected rows share one forward pass (`[2b, t]`)."""

    def loss_fn(params, batch, dropout_key):
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
        lengths = jnp.concatenate([batch["chosen_lengths"], batch["rejected_lengths"]])
        scores = model.apply({"params": params}, tokens, deterministic=dropout_key is None,
                             rngs=None if dropout_key is None else {"dropout": dropout_key})
        r_chosen, r_rejected = jnp.split(common.last_token(scores, lengths)[:, 0], 2)
        return preference_sums(pairwise_loss(r_chosen, r_rejected), r_chosen, r_rejected, batch.get("weight"))

    return loss_fn


def _named(out: dict, split: str) -> dict:
    if not out:
        return {}
    loss_key = "train_eval_loss" if split == "train" else f"{split}_loss"
    return {loss_key: out["loss"], f"{split}_pairwise_accuracy": out["correct"], f"{split}_score_margin": out["margin"]}


def _select(batch: dict) -> dict:
    return {k: batch[k] for k in BATCH_KEYS if k in batch}


def train_reward_model(cfg: RewardConfig, out_dir: str | Path | None = None, *, resume: bool = False,
                       stop_after: int | None = None, tfds_data_dir: str | None = None) -> dict:
    """Train `cfg` into `out_dir` and return the summary written to metrics.json.

    stop_after: end after this many total steps as if interrupted (resume continues)."""
    from jaxgpt.metrics import plot_curves, read_jsonl, write_json
    from jaxgpt.model import GPT, init_params
    from jaxgpt.optim import lr_schedule
    from jaxgpt.parallel import DataParallel, resolve_num_devices
    from jaxgpt.steps import eval_step
    from jaxgpt.trainer import Keys, RunDir, TrainLoop, default_out_dir, evaluate_batches, is_main_process, log

    started = time.perf_counter()
    run = RunDir(out_dir or default_out_dir("reward"), resume=resume)
    loaded = None
    if not resume:
        cfg, loaded = common.resolve_init(cfg)
    t, mode = cfg.train, cfg.finetune.train_mode
    data = load_preference(cfg.data, cfg.model.context_length, tfds_data_dir=tfds_data_dir)
    dp = DataParallel(resolve_num_devices(t.num_devices))
    dp.check_batch_size(t.batch_size, t.grad_accum_steps)
    per_epoch = data.steps_per_epoch(t.batch_size)
    if per_epoch == 0:
        raise UserError(f"train.batch_size={t.batch_size} is larger than the training split "
                        f"({len(data.splits['train'])} pairs); lower train.batch_size")
    attrs = {"num_classes": 1, "lora": common.lora_for(cfg)}
    common.check_lora_targets(cfg, attrs)

    keys = Keys.from_seed(t.seed)
    model = GPT(cfg.model, **attrs)
    params = init_params(cfg.model, keys.init, **attrs)
    params, state, tx, labels, trainable, total, total_steps, eval_interval = common.start_training(
        cfg, params, loaded, per_epoch, run, resume)
    run.create(cfg)

    loss_fn = reward_loss_fn(model)
    loop = TrainLoop(cfg=common.loop_config(cfg, eval_interval), run=run, dp=dp, state=state, tx=tx,
                     labels=labels, loss_fn=loss_fn, keys=keys, tokens_per_step=t.batch_size * 2 * data.max_length)
    del state, params, loaded  # the loop holds its own device copy; drop the rest (large models)
    p_eval = dp.compile_eval_step(eval_step, loss_fn=loss_fn)

    def evaluate_split(params, split: str, max_batches: int = 0) -> dict:
        if not len(data.splits[split]):
            return {}
        batches = (_select(b) for b in data.eval_batches(split, t.batch_size, max_batches))
        return _named(evaluate_batches(dp, p_eval, params, batches), split)

    def evaluate(params) -> dict:
        epoch = loop.step / per_epoch
        out = {"epoch": round(epoch, 4), **evaluate_split(params, "train", t.eval_batches),
               **evaluate_split(params, "val", t.eval_batches)}
        num = lambda k: f"{out.get(k, float('nan')):.4f}"
        log(f"epoch {epoch:.2f} (step {loop.step}): pairwise accuracy train {num('train_pairwise_accuracy')} "
            f"val {num('val_pairwise_accuracy')} | val loss {num('val_loss')}")
        return out

    log(f"model: {total:,} params, {trainable:,} trainable ({mode}) | data: {data.describe()} | "
        f"{total_steps} steps ({per_epoch}/epoch) | devices: {dp.num_devices}")
    if resume:
        before = next((r for r in read_jsonl(run.metrics_jsonl) if r.get("step") == 0), {})
    else:
        before = {"step": 0, "epoch": 0.0, **evaluate_split(loop.state.params, "val")}
        loop.writer.write(before)
    train_started = time.perf_counter()
    result = loop.run_steps(total_steps, lambda step: _select(data.train_batch(step, t.batch_size)), evaluate,
                            lr_at=lr_schedule(t, total_steps), stop_after=stop_after)
    train_seconds = time.perf_counter() - train_started

    final: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        final.update(evaluate_split(loop.state.params, split))
    summary = {
        "step": loop.step, "epoch": round(loop.step / per_epoch, 4), "train_mode": mode, "init": cfg.finetune.init,
        "trainable_params": trainable, "total_params": total, "train_loss": result["train_loss"],
        "val_pairwise_accuracy_before": before.get("val_pairwise_accuracy"), "val_loss_before": before.get("val_loss"),
        **final,
        "pairs_per_sec": loop.tokens_per_sec() / (2 * data.max_length),
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - started,
        "num_examples": {s: len(data.splits[s]) for s in ("train", "val", "test")},
        "truncated_responses": data.truncated, "max_length": data.max_length,
    }
    if is_main_process():
        write_json(run.path / "metrics.json", summary)
        records = read_jsonl(run.metrics_jsonl)
        plot_curves(run.path / "loss.png", records, "step", ["train_loss", "train_eval_loss", "val_loss"], "loss")
        plot_curves(run.path / "accuracy.png", records, "epoch", ["train_pairwise_accuracy", "val_pairwise_accuracy"],
                    "pairwise accuracy")
        acc = lambda k: f"{summary[k]:.4f}" if summary.get(k) is not None else "n/a"
        log(f"done: step {summary['step']} | pairwise accuracy train {acc('train_pairwise_accuracy')} val "
            f"{acc('val_pairwise_accuracy')} test {acc('test_pairwise_accuracy')} | "
            f"{summary['wall_seconds'] / 60:.1f} min | run: {run.path}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No reward-only flags: everything is a config key (`--set data.chosen_field=better`)."""


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cfg, out, resume = common.load_task_config(args, RewardConfig, DEFAULT_CONFIG, parser)
    train_reward_model(cfg, out, resume=resume)
    return 0


__all__ = ["RewardConfig", "load_reward_model", "reward_loss_fn", "reward_scores", "train_reward_model"]
