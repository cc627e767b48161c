"""The pretraining loop: data -> state -> compiled steps -> logs, evals, checkpoints.

Every fine-tuning task reuses the same pieces (`RunDir`, `Keys`, `TrainLoop`); only the
loss function, the data and the model head change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxgpt import checkpoint
from jaxgpt.config import Config, save_config
from jaxgpt.errors import UserError
from jaxgpt.metrics import MetricsWriter, mfu, plot_curves, read_jsonl, write_json
from jaxgpt.model import GPT, count_params
from jaxgpt.optim import make_optimizer
from jaxgpt.parallel import DataParallel, resolve_num_devices
from jaxgpt.steps import TrainState, create_train_state, eval_step, lm_loss_fn, train_step


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def init_from(spec: str, cfg: Config) -> tuple[Config, Any]:
    """`--init SPEC`: take the model shape and weights from SPEC (see `jaxgpt.weights`),
    keeping this run's dropout, compute dtype, attention kernel and remat settings."""
    from jaxgpt.hub import resolve_init

    model_cfg, params = resolve_init(spec)
    keep = {k: getattr(cfg.model, k) for k in ("dropout", "dtype", "attention", "remat", "remat_policy")}
    return dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, **keep)), params


def resume_config(run_dir: str | Path, overrides=()) -> Config:
    """The saved config of a run to resume (with `--set` overrides, e.g. more steps)."""
    if checkpoint.latest_step(run_dir) is None:
        raise UserError(f"--resume {run_dir}: no checkpoint there to resume from")
    return checkpoint.read_run_config(run_dir, overrides)


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    if is_main_process():
        tqdm.write(msg)


@dataclasses.dataclass(frozen=True)
class Keys:
    """The run's PRNG streams, all split once from `jax.random.key(seed)`."""

    init: jax.Array
    dropout: jax.Array
    sample: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> "Keys":
        init, dropout, sample = jax.random.split(jax.random.key(seed), 3)
        return cls(init=init, dropout=dropout, sample=sample)


class RunDir:
    """A run directory: config.yaml, metrics.jsonl, metrics.json, plots, checkpoints/."""

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
        """Called only after every input has been checked, so bad input leaves nothing behind."""
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.path / "config.yaml")
            if not self.resume:  # left by a run that stopped before its first checkpoint
                self.metrics_jsonl.unlink(missing_ok=True)

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"


@contextlib.contextmanager
def deferred_interrupt():
    """Within the block, Ctrl-C only sets `flag["flag"]` (the loop finishes its step, saves
    and stops); a second Ctrl-C stops at once. Off the main thread Ctrl-C is left alone."""
    flag = {"flag": False}

    def handle_sigint(signum, frame):
        flag["flag"] = True
        signal.signal(signal.SIGINT, previous)

    try:
        previous = signal.signal(signal.SIGINT, handle_sigint)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def save_when_due(save: Callable[[], None], done: int, is_eval: bool, checkpoint_interval: int,
                  interrupted: bool, where: str, run_path: Path) -> None:
    """The loops' checkpoint rule, after update number `done`: save at eval points, every
    `checkpoint_interval` updates (0 = never) and on Ctrl-C, which then stops the loop."""
    if is_eval or (checkpoint_interval and done % checkpoint_interval == 0) or interrupted:
        save()
    if interrupted:
        log(f"interrupted: saved a checkpoint at {where}; resume with --resume {run_path}")
        raise KeyboardInterrupt


def default_out_dir(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


class TrainLoop:
    """Drives a compiled step over batches with logging, evals, checkpoints and Ctrl-C.

    `next_batch(step)` returns the host batch for update number `step` (a pure function of
    the step, so resuming reproduces the data stream); `evaluate(params)` returns a dict of
    eval metrics; `on_eval(step, params)` may print samples.
    """

    def __init__(self, *, cfg, run: RunDir, dp: DataParallel, state: TrainState, tx, loss_fn,
                 keys: Keys, tokens_per_step: int, flops_model_cfg=None, seq_len: int = 0, labels=None):
        self.cfg, self.run, self.dp, self.keys = cfg, run, dp, keys
        self.state = dp.replicate(state)
        self.p_train = dp.compile_train_step(train_step, loss_fn=loss_fn, tx=tx, labels=labels)
        self.tokens_per_step = tokens_per_step
        self.flops_model_cfg, self.seq_len = flops_model_cfg, seq_len
        self.writer = MetricsWriter(run.metrics_jsonl, enabled=is_main_process())
        self.manager = checkpoint.checkpoint_manager(run.path, keep=cfg.train.keep_checkpoints)
        self.step_times: list[float] = []

    @property
    def step(self) -> int:
        return int(self.dp.first(self.state.step))

    def host_state(self) -> dict:
        """Device 0's state as a plain dict of host arrays: what Orbax saves."""
        state = self.dp.unreplicate(self.state)
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state}

    def save(self) -> None:
        step = self.step
        if self.manager.latest_step() == step:  # already saved at this step (e.g. an eval point)
            return
        meta = {
            "step": step,
            "data_batches_consumed": step,
            "rng_key_data": np.asarray(jax.random.key_data(self.keys.dropout)).tolist(),
            "seed": self.cfg.train.seed,
        }
        checkpoint.save(self.manager, step, self.host_state(), meta)

    def run_steps(self, max_steps: int, next_batch: Callable[[int], dict],
                  evaluate: Callable[[Any], dict], on_eval: Callable[[int, Any], None] | None = None,
                  lr_at: Callable[[int], float] | None = None, stop_after: int | None = None) -> dict:
        t = self.cfg.train
        accum = t.grad_accum_steps
        start = self.step
        end = min(max_steps, stop_after) if stop_after else max_steps
        losses: list[jax.Array] = []
        last_train_loss = float("nan")
        bar = tqdm(total=end, initial=start, desc="train", disable=not is_main_process(),
                   dynamic_ncols=True, unit="step")
        batch = self.dp.shard_train(next_batch(start), accum) if start < end else None
        with deferred_interrupt() as interrupted:
            try:
                for step in range(start, end):
                    t0 = time.perf_counter()
                    self.state, metrics = self.p_train(self.state, batch, self.keys.dropout)
                    if step + 1 < end:  # prepare the next batch while the device works
                        batch = self.dp.shard_train(next_batch(step + 1), accum)
                    metrics = self.dp.first(metrics)
                    jax.block_until_ready(metrics["loss"])
                    self.step_times.append(time.perf_counter() - t0)
                    losses.append(metrics["loss"])
                    done = step + 1
                    is_eval = done % t.eval_interval == 0 or done == end
                    if done % t.log_interval == 0 or is_eval:
                        last_train_loss = float(np.mean(jax.device_get(losses)))
                        losses = []
                        if not np.isfinite(last_train_loss):
                            raise UserError(
                                f"training diverged: train loss is {last_train_loss} at step {done}; "
                                "lower train.lr or raise train.warmup_steps (no checkpoint was written for it)"
                            )
                        record = self.progress_record(done, last_train_loss, lr_at)
                        if is_eval:
                            record.update(evaluate(self.state.params))
                            if on_eval is not None:
                                on_eval(done, self.state.params)
                        self.writer.write(record)
                        bar.set_postfix(loss=f"{last_train_loss:.3f}",
                                        tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
                    bar.update(1)
                    save_when_due(self.save, done, is_eval, t.checkpoint_interval, interrupted["flag"],
                                  f"step {done}", self.run.path)
            finally:
                bar.close()
        return {"train_loss": last_train_loss}

    def tokens_per_sec(self) -> float:
        times = self.step_times[1:] or self.step_times  # the first step includes compilation
        return self.tokens_per_step / statistics.median(times) if times else float("nan")

    def progress_record(self, step: int, train_loss: float, lr_at) -> dict:
        tps = self.tokens_per_sec()
        record = {"step": step, "tokens_seen": step * self.tokens_per_step, "train_loss": train_loss}
        if lr_at is not None:
            record["lr"] = float(lr_at(step - 1))
        record["tokens_per_sec"] = tps
        if self.flops_model_cfg is not None:
            record["mfu"] = mfu(tps, self.flops_model_cfg, self.seq_len, self.dp.num_devices * jax.process_count())
        return record


def evaluate_batches(dp: DataParallel, p_eval, params, batches: Iterable[dict]) -> dict:
    """Exact means over every batch: sum each metric, divide by the summed `count`."""
    totals: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(dp.first(p_eval(params, dp.shard_eval(batch))))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count", 0.0)
    return {k: v / count for k, v in totals.items()} if count else {}


# ---------------------------------------------------------------------------------------
# Pretraining


def pretrain(cfg: Config, out_dir: str | Path | None = None, *, resume: bool = False,
             params: Any = None, stop_after: int | None = None) -> dict:
    """Train `cfg` and return the summary written to `metrics.json`.

    params: initial weights (e.g. from `--init`) instead of a random init.
    stop_after: end after this many total steps as if interrupted (the schedule still runs
    to `train.max_steps`); resuming continues from there.
    """
    from jaxgpt.data import pretraining_data  # imported here: tfds is slow to import

    t, m = cfg.train, cfg.model
    run = RunDir(out_dir or default_out_dir("train"), resume=resume)
    dp = DataParallel(resolve_num_devices(t.num_devices))
    dp.check_batch_size(t.batch_size // jax.process_count(), t.grad_accum_steps)
    data = pretraining_data(cfg, process_index=jax.process_index(), process_count=jax.process_count())

    keys = Keys.from_seed(t.seed)
    model = GPT(m)
    tx = make_optimizer(t)
    if params is None:
        from jaxgpt.model import init_params

        params = init_params(m, keys.init)
    state = create_train_state(params, tx)
    if resume:
        target = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        restored, _ = checkpoint.restore(run.path, target=target)
        state = TrainState(**restored)
        log(f"resuming {run.path} from step {int(state.step)}")
    run.create(cfg)

    loss_fn = lm_loss_fn(model)
    seq = data.context_length
    loop = TrainLoop(cfg=cfg, run=run, dp=dp, state=state, tx=tx, loss_fn=loss_fn, keys=keys,
                     tokens_per_step=t.batch_size * seq, flops_model_cfg=m, seq_len=seq)
    p_eval = dp.compile_eval_step(eval_step, loss_fn=loss_fn)

    def evaluate(params) -> dict:
        out = evaluate_batches(dp, p_eval, params, data.val_batches(t.eval_batches))
        result = {"val_loss": out["loss"]} if out else {}
        if t.eval_train_batches:  # the train loss as the book reports it: eval mode, fixed batches
            train_out = evaluate_batches(dp, p_eval, params, data.train_eval_batches(t.eval_train_batches))
            result["train_eval_loss"] = train_out["loss"]
        return result

    def show_sample(step: int, params) -> None:
        if t.sample_tokens and is_main_process():
            log(f"step {step} sample: {sample_text(m, dp.unreplicate(params), t.sample_prompt, t.sample_tokens)!r}")

    from jaxgpt.optim import lr_schedule

    schedule = lr_schedule(t)
    n_params = count_params(params)
    log(f"model: {n_params:,} params | data: {data.describe()} | devices: {dp.num_devices} x {jax.process_count()} process(es)")
    result = loop.run_steps(t.max_steps, data.train_batch, evaluate, show_sample, schedule, stop_after)

    final = evaluate(loop.state.params)
    summary = {
        "step": loop.step,
        "tokens_seen": loop.step * loop.tokens_per_step,
        "train_loss": result["train_loss"],
        "val_loss": final.get("val_loss"),
        **({"train_eval_loss": final["train_eval_loss"]} if "train_eval_loss" in final else {}),
        "tokens_per_sec": loop.tokens_per_sec(),
        "mfu": mfu(loop.tokens_per_sec(), m, seq, dp.num_devices * jax.process_count()),
        "params": n_params,
        "sample": sample_text(m, loop.host_state()["params"], t.sample_prompt, t.sample_tokens)
        if t.sample_tokens else "",
    }
    if is_main_process():
        write_json(run.path / "metrics.json", summary)
        log(f"done: step {summary['step']} | train loss {summary['train_loss']:.3f} | "
            f"val loss {summary['val_loss'] if summary['val_loss'] is None else round(summary['val_loss'], 3)} | "
            f"{summary['tokens_per_sec']:.0f} tokens/s | run: {run.path}")
        if summary["sample"]:
            log(f"sample: {summary['sample']!r}")
        records = read_jsonl(run.metrics_jsonl)
        plot_curves(run.path / "loss.png", records, "tokens_seen", ["train_loss", "train_eval_loss", "val_loss"], "loss")
    return summary


def sample_text(model_cfg, params, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (shortened to fit the context), for progress samples."""
    from jaxgpt.sampling import generate
    from jaxgpt.tokenizer import encode

    ids = encode(prompt)[-max(model_cfg.context_length - max_new_tokens, 1):]
    max_new = min(max_new_tokens, model_cfg.context_length - len(ids))
    if max_new <= 0:
        return ""
    return prompt + generate(params, model_cfg, [ids], max_new_tokens=max_new, temperature=0.0)[0]
