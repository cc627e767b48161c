"""`finetune.py classify`: sequence classification with a GPT (Raschka ch. 6 and appendix E).

The LM head is replaced by a `num_classes` head (`score`, `jaxgpt.model.GPT(num_classes=...)`),
and the class logits are read at each row's last real token (rows are right-padded with
`<|endoftext|>`; attention is causal, so nothing after that token, padding included, can
change them). Loss: cross-entropy on those logits, through the shared `train_step` and
`TrainLoop` (AdamW, pmapped data parallelism, checkpoints, `--resume`); evaluation on the
train and val splits at the end of every epoch, and on all three splits at the end.

Run directory: config.yaml, labels.json (`{"labels": [...], "max_length": T}`: class id =
index), metrics.jsonl, metrics.json, loss.png, accuracy.png, checkpoints/. Metrics:
`train_loss` is the running loss of the updates (as in pretraining); `train_eval_loss`,
`train_accuracy`, `val_loss`, `val_accuracy` are evaluated with dropout off over the whole
split (each epoch end, capped by `train.eval_batches`; at the end uncapped), `test_loss` and
`test_accuracy` at the end only; plus `trainable_params`, `total_params`, timings.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import ModelConfig
from jaxgpt.data.classification import ClassifyDataConfig, encode_texts, load_classification, pad_batch
from jaxgpt.errors import UserError
from jaxgpt.lora import LoRAConfig
from jaxgpt.tasks import common, default_config
from jaxgpt.tasks.common import FinetuneConfig, FinetuneTrainConfig

DEFAULT_CONFIG = default_config("classify")
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class ClassifyConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


CONFIG_CLASS = ClassifyConfig


def build_model(cfg: ClassifyConfig, num_classes: int):
    """The classifier: GPT with a `score` head (and LoRA adapters in lora mode)."""
    from jaxgpt.model import GPT

    return GPT(cfg.model, num_classes=num_classes, lora=common.lora_for(cfg))


def classification_loss_fn(model):
    """`loss_fn(params, batch, dropout_key) -> (ce_sum, {"count", "correct"})`.

    batch: `tokens [b, t]`, `lengths [b]`, `labels [b]` int32, optional `weight [b]` float32
    (0 on the padding rows of the last eval batch)."""

    def loss_fn(params, batch, dropout_key):
        logits = model.apply(
            {"params": params}, batch["tokens"], deterministic=dropout_key is None,
            rngs=None if dropout_key is None else {"dropout": dropout_key},
        )
        logits = common.last_token(logits, batch["lengths"])  # [b, classes], float32
        labels = batch["labels"]
        weight = batch.get("weight")
        weight = jnp.ones(labels.shape, jnp.float32) if weight is None else weight.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return jnp.sum(ce * weight), {"count": jnp.sum(weight), "correct": jnp.sum(correct * weight)}

    return loss_fn


def _named(out: dict, split: str) -> dict:
    """`{split}_loss`, `{split}_accuracy`; on the train split the loss is `train_eval_loss`
    (dropout off, whole split), since `train_loss` is the running loss of the updates."""
    if not out:
        return {}
    loss_key = "train_eval_loss" if split == "train" else f"{split}_loss"
    return {loss_key: out["loss"], f"{split}_accuracy": out["correct"]}


def finetune_classifier(cfg: ClassifyConfig, out_dir: str | Path | None = None, *, resume: bool = False,
                        stop_after: int | None = None, tfds_data_dir: str | None = None) -> dict:
    """Fine-tune `cfg` into `out_dir` and return the summary written to `metrics.json`.

    stop_after: end after this many total steps as if interrupted (resume continues)."""
    from jaxgpt.metrics import plot_curves, read_jsonl, write_json
    from jaxgpt.model import init_params
    from jaxgpt.optim import lr_schedule
    from jaxgpt.parallel import DataParallel, resolve_num_devices
    from jaxgpt.steps import eval_step
    from jaxgpt.trainer import Keys, RunDir, TrainLoop, default_out_dir, evaluate_batches, is_main_process, log

    started = time.perf_counter()
    run = RunDir(out_dir or default_out_dir("classify"), resume=resume)
    loaded = None
    if not resume:
        cfg, loaded = common.resolve_init(cfg)
    t, mode = cfg.train, cfg.finetune.train_mode
    data = load_classification(cfg.data, cfg.model.context_length, tfds_data_dir=tfds_data_dir)
    if resume:
        saved = json.loads((run.path / LABELS_FILE).read_text()) if (run.path / LABELS_FILE).is_file() else None
        if saved is not None and saved["labels"] != data.labels:
            raise UserError(f"--resume {run.path}: the data's labels {data.labels} differ from the run's {saved['labels']}")
    dp = DataParallel(resolve_num_devices(t.num_devices))
    dp.check_batch_size(t.batch_size, t.grad_accum_steps)
    per_epoch = data.steps_per_epoch(t.batch_size)
    if per_epoch == 0:
        raise UserError(f"train.batch_size={t.batch_size} is larger than the training split "
                        f"({len(data.splits['train'])} examples); lower train.batch_size")
    attrs = {"num_classes": data.num_classes, "lora": common.lora_for(cfg)}
    common.check_lora_targets(cfg, attrs)

    keys = Keys.from_seed(t.seed)
    model = build_model(cfg, data.num_classes)
    params = init_params(cfg.model, keys.init, seq_len=data.max_length, **attrs)
    params, state, tx, labels, trainable, total, total_steps, eval_interval = common.start_training(
        cfg, params, loaded, per_epoch, run, resume)
    run.create(cfg)
    if is_main_process() and not resume:
        (run.path / LABELS_FILE).write_text(json.dumps({"labels": data.labels, "max_length": data.max_length}) + "\n")

    loss_fn = classification_loss_fn(model)
    loop = TrainLoop(cfg=common.loop_config(cfg, eval_interval), run=run, dp=dp, state=state, tx=tx,
                     labels=labels, loss_fn=loss_fn, keys=keys, tokens_per_step=t.batch_size * data.max_length)
    p_eval = dp.compile_eval_step(eval_step, loss_fn=loss_fn)

    def evaluate_split(params, split: str, max_batches: int = 0) -> dict:
        if not len(data.splits[split]):
            return {}
        return _named(evaluate_batches(dp, p_eval, params, data.eval_batches(split, t.batch_size, max_batches)), split)

    def evaluate(params) -> dict:
        epoch = loop.step / per_epoch
        out = {"epoch": round(epoch, 4), **evaluate_split(params, "train", t.eval_batches),
               **evaluate_split(params, "val", t.eval_batches)}
        log(f"epoch {epoch:.2f} (step {loop.step}): train acc {out.get('train_accuracy', float('nan')):.4f} | "
            f"val acc {out.get('val_accuracy', float('nan')):.4f} | val loss {out.get('val_loss', float('nan')):.4f}")
        return out

    log(f"model: {total:,} params, {trainable:,} trainable ({mode}) | data: {data.describe()} | "
        f"{total_steps} steps ({per_epoch}/epoch) | devices: {dp.num_devices}")
    train_started = time.perf_counter()
    result = loop.run_steps(total_steps, lambda step: data.train_batch(step, t.batch_size), evaluate,
                            lr_at=lr_schedule(t, total_steps), stop_after=stop_after)
    train_seconds = time.perf_counter() - train_started

    final: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        final.update(evaluate_split(loop.state.params, split))
    summary = {
        "step": loop.step,
        "epoch": round(loop.step / per_epoch, 4),
        "train_mode": mode,
        "init": cfg.finetune.init,
        "trainable_params": trainable,
        "total_params": total,
        "train_loss": result["train_loss"],
        **final,
        "examples_per_sec": loop.tokens_per_sec() / data.max_length,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "num_examples": {s: len(data.splits[s]) for s in ("train", "val", "test")},
        "labels": data.labels,
        "max_length": data.max_length,
    }
    if is_main_process():
        write_json(run.path / "metrics.json", summary)
        records = read_jsonl(run.metrics_jsonl)
        plot_curves(run.path / "loss.png", records, "step", ["train_loss", "train_eval_loss", "val_loss"], "loss")
        plot_curves(run.path / "accuracy.png", records, "epoch", ["train_accuracy", "val_accuracy"], "accuracy")
        acc = lambda k: f"{summary[k]:.4f}" if summary.get(k) is not None else "n/a"
        log(f"done: step {summary['step']} | accuracy train {acc('train_accuracy')} val {acc('val_accuracy')} "
            f"test {acc('test_accuracy')} | {trainable:,} / {total:,} params trained | "
            f"{summary['wall_seconds'] / 60:.1f} min | run: {run.path}")
    return summary


# ---------------------------------------------------------------------------------------
# Prediction


def load_classifier(run_dir: str | Path) -> tuple[ClassifyConfig, Any, list[str], int]:
    """`(cfg, plain params, labels, max_length)` of a classify run (LoRA adapters merged)."""
    run_dir = Path(run_dir)
    cfg, params = common.load_run(run_dir, ClassifyConfig)
    path = run_dir / LABELS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a classification run (no {LABELS_FILE})")
    meta = json.loads(path.read_text())
    return cfg, params, list(meta["labels"]), int(meta["max_length"])


def predict(cfg: ClassifyConfig, params, labels: Sequence[str], max_length: int, texts: Sequence[str],
            batch_size: int = 32) -> list[tuple[str, float]]:
    """`(label, probability)` of the most likely class of each text (truncated to max_length)."""
    from jaxgpt.model import GPT

    model = GPT(cfg.model, num_classes=len(labels))  # params are merged: no LoRA attribute

    @jax.jit
    def probs(params, tokens, lengths):
        logits = common.last_token(model.apply({"params": params}, tokens), lengths)
        return jax.nn.softmax(logits, axis=-1)

    out = []
    ids = encode_texts(list(texts), max_length)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        tokens, lengths = pad_batch(chunk + [[0]] * (batch_size - len(chunk)), max_length)
        p = np.asarray(probs(params, tokens, lengths))[: len(chunk)]
        out.extend((labels[int(i)], float(row[i])) for row, i in zip(p, p.argmax(-1)))
    return out


# ---------------------------------------------------------------------------------------
# Command line (`finetune.py classify`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No classify-only flags yet: everything is a config key (`--set data.label_field=y`)."""


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cfg, out, resume = common.load_task_config(args, ClassifyConfig, DEFAULT_CONFIG, parser)
    finetune_classifier(cfg, out, resume=resume)
    return 0
