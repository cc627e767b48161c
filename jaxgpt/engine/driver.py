"""The driver: the sequence every task shares, around one `Loop`.

    check the run directory -> --init weights -> devices -> the recipe's checks and data
    -> schedule -> model, initial params (--init grafted), train-mode labels, optimiser
    -> --resume: the checkpoint's state and meta -> frozen references (recipe.prepare)
    -> [nothing written before this line] lock, run directory, config.yaml -> the evaluation
    before training -> the loop -> the final evaluation -> metrics.json, outputs, plots

`train(recipe_cls, cfg, out_dir)` is every task's Python entry point (`pretrain`,
`finetune_classifier`, ... are it with the recipe bound) and returns the summary written to
metrics.json.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from jaxgpt.io import checkpoint
from jaxgpt.engine.keys import Keys
from jaxgpt.engine.loop import Cadence, Loop
from jaxgpt.engine.params import check_lora_targets, graft, init_from, param_counts, train_labels
from jaxgpt.engine.recipe import Recipe, Schedule
from jaxgpt.engine.metrics import MetricsWriter, check_tensorboard, plot_curves, read_jsonl, write_json
from jaxgpt.errors import UserError
from jaxgpt.models import family_of
from jaxgpt.train.optim import lr_schedule, make_optimizer
from jaxgpt.parallel import layout_for
from jaxgpt.engine.rundir import RunDir, RunLock, default_out_dir, is_main_process, log, truncate_metrics
from jaxgpt.train.steps import TrainState, create_train_state, eval_step, train_step


@dataclass
class Start:
    """What a run trains from: the recipe (with its data), the model, state and optimiser."""

    task: Recipe
    schedule: Schedule
    model: Any
    state: TrainState
    tx: Any
    labels: Any  # the train mode's label tree (None: pretraining, everything trains)
    meta: dict  # the restored checkpoint's meta ({} for a new run)
    iteration: int  # where the loop starts


def train(recipe_cls: type[Recipe], cfg, out_dir: str | Path | None = None, *, resume: bool = False,
          init: str | None = None, stop_after: int | None = None, tfds_data_dir: str | None = None) -> dict:
    """Run `recipe_cls` with `cfg` into `out_dir` (default `runs/<name>-<timestamp>`).

    init: `--init SPEC` (default: the config's `finetune.init`). stop_after: end after this
    many iterations as if interrupted (the schedule still runs to its end; --resume continues).
    """
    started = time.perf_counter()
    run = RunDir(out_dir or default_out_dir(recipe_cls.name), resume=resume)
    lock = RunLock(run.path, enabled=is_main_process())
    try:
        if resume:  # before the restore, which may move damaged checkpoints aside
            lock.acquire()
        start = prepare(recipe_cls, cfg, run, init, tfds_data_dir)
        lock.acquire()
        return run_loop(start, run, stop_after, started)
    finally:
        lock.release()


def prepare(recipe_cls: type[Recipe], cfg, run: RunDir, init: str | None, tfds_data_dir: str | None) -> Start:
    """Everything before the first write: checks, data, params, optimiser, --resume."""
    recipe_cls.validate_config(cfg)
    finetune = getattr(cfg, "finetune", None)
    init = init or (finetune.init if finetune is not None else "")
    loaded = None
    if init and (not run.resume or recipe_cls.reference_on_resume):
        cfg, loaded = init_from(init, cfg)
    t = cfg.train
    family = family_of(cfg.model)
    family.validate(cfg.model)
    dp = layout_for(cfg)
    task = recipe_cls(cfg, dp=dp, run=run, keys=Keys.from_seed(t.seed), tfds_data_dir=tfds_data_dir)
    if cfg.model.vocab_size < task.tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{task.tokenizer.vocab_size:,} ids ({cfg.model.tokenizer}); use at least {task.tokenizer.vocab_size}")
    task.validate()
    if t.tensorboard:
        check_tensorboard()
    task.load_data()
    schedule = task.schedule()

    mode = finetune.train_mode if finetune is not None else None
    attrs = {**task.model_attrs(), "lora": cfg.lora if mode == "lora" else None}
    if mode == "lora":
        check_lora_targets(cfg, attrs)
    params = dp.initialise(functools.partial(family.init_params, cfg.model, **attrs), task.keys.init, jit=task.jit_init)
    if loaded is not None:
        params = graft(params, loaded, init, consume=True)
        loaded = None
    labels = train_labels(params, mode, cfg.model) if mode else None
    task.trainable, task.total = param_counts(params, labels)
    tx = make_optimizer(t, labels, schedule.updates)
    state = create_train_state(params, tx)
    meta, iteration = {}, 0
    if run.resume:
        target = dp.restore_target({"step": state.step, "params": state.params, "opt_state": state.opt_state})
        restored, meta = checkpoint.restore(run.path, target=target, quarantine=True)
        state, meta = TrainState(**restored), dict(meta or {})
        iteration = int(meta.get("iteration", state.step))
    task.prepare(params, meta)  # frozen references from the initial params
    return Start(task, schedule, family.build(cfg.model, **attrs), state, tx, labels, meta, iteration)


def run_loop(start: Start, run: RunDir, stop_after: int | None, started: float) -> dict:
    """The run itself, from the first write: run directory, loop, results."""
    task, t = start.task, start.task.cfg.train
    unit = "iteration" if task.rl else "step"
    mode = f", {task.trainable:,} trainable ({task.cfg.finetune.train_mode})" if hasattr(task.cfg, "finetune") else ""
    log(" | ".join(filter(None, [f"model: {task.total:,} params{mode}", task.describe(),
                                 f"{start.schedule.iterations} {unit}s",
                                 task.dp.describe()])))
    if run.resume:
        log(f"resuming {run.path} from {unit} {start.iteration}")
        if is_main_process():  # records a killed run logged after its last checkpoint
            truncate_metrics(run.metrics_jsonl, start.iteration, key=unit)
    run.create(task.cfg)
    task.created()

    loss_fn = task.loss_fn(start.model)
    task.p_eval = task.dp.compile_eval_step(eval_step, loss_fn=loss_fn)
    placed = task.dp.place(start.state, train_step, t.grad_accum_steps, loss_fn=loss_fn, tx=start.tx,
                           labels=start.labels)
    start.state = None  # the placed state holds its own device copy; drop the rest (large models)
    writer = MetricsWriter(run.metrics_jsonl, enabled=is_main_process(),
                           tensorboard_dir=run.path / "tensorboard" if t.tensorboard else None)
    before = start.meta.get("eval_before")
    if before is None:
        before = task.evaluate_before(placed)
        if before is not None:
            log("before training: " + " | ".join(f"{k} {v:.4f}" for k, v in before.items() if isinstance(v, float)))
            if task.log_before:
                writer.write({"step": 0, "epoch": 0.0, "tokens_seen": 0, **before})
    cadence = Cadence(total=start.schedule.iterations, log_interval=t.log_interval,
                      eval_interval=start.schedule.eval_interval, checkpoint_interval=t.checkpoint_interval,
                      stop_after=stop_after)
    loop = Loop(run=run, placed=placed, keys=task.keys, writer=writer, cadence=cadence, iteration=start.iteration,
                meta={"eval_before": before} if before is not None else {}, metric_names=task.metric_names,
                lr_at=lr_schedule(t, start.schedule.updates), throughput=task.throughput(), rl=task.rl,
                postfix=task.postfix, keep_checkpoints=t.keep_checkpoints, seed=t.seed)
    train_started = time.perf_counter()
    try:
        loop.run(task.source, task.evaluate)
    finally:
        writer.close()
    train_seconds = time.perf_counter() - train_started

    final = task.final(loop)
    summary = {**({"iteration": loop.iteration} if task.rl else {}), "step": loop.step,
               **task.summary(loop, before or {}, final),
               "trainable_params": task.trainable, "total_params": task.total,
               "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - started}
    if is_main_process():
        write_json(run.path / "metrics.json", summary)
        task.write_outputs(loop, summary)
        records = read_jsonl(run.metrics_jsonl)
        for plot in task.plots:
            plot_curves(run.path / plot.file, records, plot.x, plot.ys, plot.ylabel)
        log(" | ".join(filter(None, [f"done: {unit} {loop.iteration}", task.done_line(summary),
                                     f"{summary['wall_seconds'] / 60:.1f} min", f"run: {run.path}"])))
    return summary


__all__ = ["Start", "prepare", "run_loop", "train"]
