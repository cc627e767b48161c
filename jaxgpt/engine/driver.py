"""The driver: the sequence every task shares, around one `Loop`.

    check the run directory -> --init weights -> devices -> the recipe's checks and data
    -> schedule -> model, initial params (--init grafted), train-mode labels, optimiser
    -> --resume: the checkpoint's state and meta -> frozen references (recipe.prepare)
    -> [nothing written before this line] a finished run? (--resume of a run whose loop is
    done: say so and stop, or write its missing results) -> room for the checkpoints? -> lock,
    run directory, config.yaml -> the evaluation before training -> the loop -> the final
    evaluation -> outputs, plots, metrics.json (last: a run is finished once it exists)

`train(recipe_cls, cfg, out_dir)` is every task's Python entry point (`pretrain`,
`finetune_classifier`, ... are it with the recipe bound) and returns the summary written to
metrics.json. Around it: Ctrl-C and SIGTERM handlers (`jaxgpt.engine.preemption`; every
process stops at the same iteration), and on the way out, whatever happened, no lock file or
temporary left in the run directory; a full disk anywhere is one line naming the file and the
newest intact checkpoint, and a failed collective of a multi-process run one line too.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from jaxgpt.io import checkpoint
from jaxgpt.engine.keys import Keys
from jaxgpt.engine.loop import Cadence, Loop
from jaxgpt.engine.preemption import StopRequests
from jaxgpt.engine.params import check_lora_targets, graft, init_from, param_counts, train_labels
from jaxgpt.engine.recipe import Recipe, Schedule
from jaxgpt.engine.metrics import MetricsWriter, check_tensorboard, plot_curves, read_jsonl, write_json
from jaxgpt.errors import UserError
from jaxgpt.config.checks import validate
from jaxgpt.models import family_of
from jaxgpt.train.optim import lr_schedule, make_optimizer
from jaxgpt.parallel import layout_for
from jaxgpt.engine.rundir import (RunDir, RunLock, check_free_space, default_out_dir, is_main_process, log,
                                  truncate_metrics)
from jaxgpt.io.files import DiskFull, disk_full_reason, is_disk_full
from jaxgpt.parallel.distributed import is_multiprocess, set_run, stop_sync
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
    named = set_run(run.path)
    with StopRequests(stop_sync()) as stops:
        try:
            if resume:  # before the restore, which may move damaged checkpoints aside
                lock.acquire()
                run.remove_temporaries()  # of a killed run
            start = prepare(recipe_cls, cfg, run, init, tfds_data_dir)
            lock.acquire()
            return run_loop(start, run, stop_after, started, stops)
        except Exception as e:
            failure = run_failure(e, run)
            if failure is None:
                raise
            raise failure from None
        finally:
            run.remove_temporaries()
            lock.release()
            set_run(named)


def run_failure(e: BaseException, run: RunDir) -> UserError | None:
    """The one-line error for a full disk (naming the file and the newest intact checkpoint)
    or a failed collective of a multi-process run; None for any other error."""
    if is_disk_full(e):
        if isinstance(e, DiskFull):
            what = str(e)
        else:
            path = getattr(e, "filename", None) or run.path
            what = str(DiskFull("a file", path, disk_full_reason(e)))
        newest = checkpoint.newest_intact_step(run.path)
        if newest is None:
            return UserError(f"{what}; no checkpoint was written yet; free space and run again")
        return UserError(f"{what}; the newest intact checkpoint is step {newest} "
                         f"({run.path / checkpoint.CHECKPOINT_DIR / str(newest)}); free space, then --resume {run.path}")
    if is_multiprocess() and isinstance(e, jax.errors.JaxRuntimeError):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return UserError(f"process {jax.process_index()} stopped: a computation across processes failed ({first}); "
                         f"if another process died or was stopped, restart every process with --resume {run.path}")
    return None


def prepare(recipe_cls: type[Recipe], cfg, run: RunDir, init: str | None, tfds_data_dir: str | None) -> Start:
    """Everything before the first write: checks, data, params, optimiser, --resume."""
    recipe_cls.validate_config(cfg)
    finetune = getattr(cfg, "finetune", None)
    init = init or (finetune.init if finetune is not None else "")
    loaded = None
    if init and (not run.resume or recipe_cls.reference_on_resume):
        cfg, loaded = init_from(init, cfg)
        validate(cfg)  # the other sections against the checkpoint's shape (e.g. data.context_length)
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


def finished_results(run: RunDir, start: Start) -> dict | None:
    """metrics.json of a run whose loop is done, when it is complete (it is written last and
    records the same step); None when the results are still to be written."""
    try:
        summary = json.loads((run.path / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    key = "iteration" if start.task.rl else "step"
    return summary if isinstance(summary, dict) and summary.get(key) == start.iteration else None


def run_loop(start: Start, run: RunDir, stop_after: int | None, started: float,
             stops: StopRequests | None = None) -> dict:
    """The run itself, from the first write: run directory, loop, results."""
    task, t = start.task, start.task.cfg.train
    unit = "iteration" if task.rl else "step"
    finished = run.resume and start.iteration >= start.schedule.iterations
    if finished:  # nothing to train: never rewrite a finished run's results
        done = finished_results(run, start)
        where = f"{run.path} is finished ({unit} {start.iteration} of {start.schedule.iterations})"
        if done is not None:
            longer = "train.epochs=N" if getattr(t, "epochs", 0) > 0 else "train.max_steps=N"
            log(f"{where}; its results are in {run.path / 'metrics.json'}, nothing to do (to train longer: "
                f"--resume {run.path} --set {longer})")
            return done
        log(f"{where}; writing its missing results from the last checkpoint")
    mode = f", {task.trainable:,} trainable ({task.cfg.finetune.train_mode})" if hasattr(task.cfg, "finetune") else ""
    log(" | ".join(filter(None, [f"model: {task.total:,} params{mode}", task.describe(),
                                 f"{start.schedule.iterations} {unit}s",
                                 task.dp.describe()])))
    if not finished:
        state = start.state
        check_free_space(run.path, checkpoint.estimated_size((state.step, state.params, state.opt_state)),
                         t.keep_checkpoints, existing=len(checkpoint.all_steps(run.path)) if run.resume else 0)
    if run.resume and not finished:
        log(f"resuming {run.path} from {unit} {start.iteration}")
        if is_main_process():  # records a killed run logged after its last checkpoint
            truncate_metrics(run.metrics_jsonl, start.iteration, key=unit)
    if not finished:
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
    if before is None and not finished:
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
                postfix=task.postfix, keep_checkpoints=t.keep_checkpoints, seed=t.seed, restored=start.meta,
                stops=stops)
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
        task.write_outputs(loop, summary)
        records = read_jsonl(run.metrics_jsonl)
        for plot in task.plots:
            plot_curves(run.path / plot.file, records, plot.x, plot.ys, plot.ylabel)
        write_json(run.path / "metrics.json", summary)  # last: its presence marks a finished run
        log(" | ".join(filter(None, [f"done: {unit} {loop.iteration}", task.done_line(summary),
                                     f"{summary['wall_seconds'] / 60:.1f} min", f"run: {run.path}"])))
    return summary


__all__ = ["Start", "finished_results", "prepare", "run_failure", "run_loop", "train"]
