"""The one training loop: pretraining, supervised fine-tuning and RL run through it.

An *iteration* asks the task's source for its minibatches and makes one optimiser update
on each (`PlacedState.update`):

    supervised    source(s) -> [batch s]                 (a pure function of s: resumable)
    RL            source(s) -> rollouts of the current policy, inner epochs x minibatches

then, by the cadence (arguments, not config): a log record every `log_interval`
iterations (the mean of each metric since the last record), an evaluation every
`eval_interval` and at the end, a checkpoint at every evaluation, every
`checkpoint_interval` and on a stop request: Ctrl-C or SIGTERM, on any process of a
multi-process run (`jaxgpt.engine.preemption`), after which the loop raises `Stopped`.
Losses are checked for NaN/inf before every record, and losses and params before every save
(`jaxgpt.engine.rundir.DivergenceGuard`), so no checkpoint ever holds a diverged state and the last
good one is never rotated out by a bad one.
Records go to `metrics.jsonl` (and TensorBoard when asked) through one `MetricsWriter`.

A checkpoint's meta holds what the next records need besides the state: the iterations
logged since the last record (`window`: each one's metric means, so a run resumed between
two records logs the same mean as an uninterrupted one) and the last record (`last_record`:
a finished run's summary can be written from its checkpoint).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxgpt.io import checkpoint
from jaxgpt.engine.keys import Keys
from jaxgpt.engine.preemption import StopRequests
from jaxgpt.engine.rundir import DivergenceGuard, RunDir, is_main_process, log
from jaxgpt.engine.metrics import MetricsWriter, _plain, mfu

# `source(iteration, local_params) -> (minibatches, stats)`: host batches for the updates
# of `iteration`, and host-side statistics (floats) to log; `local_params()` gives the
# current params on one device, for sources that sample from the policy.
Source = Callable[[int, Callable[[], Any]], tuple[Sequence[dict], dict]]


@dataclass(frozen=True)
class Cadence:
    """When the loop logs, evaluates and saves, in iterations."""

    total: int  # iterations of the schedule
    log_interval: int
    eval_interval: int
    checkpoint_interval: int = 0  # 0: only at evaluations, at the end and on Ctrl-C / SIGTERM
    stop_after: int | None = None  # end here as if interrupted (the schedule still runs to `total`)

    @property
    def end(self) -> int:
        return min(self.total, self.stop_after) if self.stop_after else self.total


@dataclass(frozen=True)
class Throughput:
    """What a record's `tokens_per_sec` and `mfu` are computed from (None: not logged)."""

    tokens_per_iteration: int
    model_cfg: Any = None  # for mfu
    seq_len: int = 0
    num_devices: int = 1


class Loop:
    """Runs iterations of a source through a placed state; see the module docstring.

    metric_names: which step metrics a record keeps and under what name (supervised tasks:
    `{"loss": "train_loss"}`); None keeps them all (RL: loss, clip_frac, kl, ...).
    rl: an iteration is rollouts plus updates, so records carry `iteration` beside `step`
    (otherwise one update per iteration: `step` and, with `throughput`, `tokens_seen`).
    meta: JSON saved with every checkpoint (e.g. the evaluation before training).
    postfix: progress-bar label -> record key.
    restored: the meta of the checkpoint the loop resumes from (its `window` and `last_record`).
    stops: the run's `StopRequests` (None: the loop installs its own while it runs).
    """

    def __init__(self, *, run: RunDir, placed, keys: Keys, writer: MetricsWriter, cadence: Cadence,
                 iteration: int = 0, meta: dict | None = None, metric_names: dict[str, str] | None = None,
                 lr_at: Callable[[int], float] | None = None, throughput: Throughput | None = None,
                 rl: bool = False, postfix: dict[str, str] | None = None, keep_checkpoints: int = 2,
                 seed: int = 0, restored: dict | None = None, stops: StopRequests | None = None):
        self.run_dir, self.placed, self.keys, self.writer, self.cadence = run, placed, keys, writer, cadence
        self.iteration = iteration
        self.meta = dict(meta or {})
        self.stops = stops
        restored = restored or {}
        self.window: list[dict] = [{"values": dict(v)} for v in restored.get("window") or []]
        self.metric_names, self.lr_at, self.throughput, self.rl = metric_names, lr_at, throughput, rl
        self.postfix = postfix or {"loss": "train_loss"}
        self.seed = seed
        self.unit = "iteration" if rl else "step"
        self.manager = checkpoint.checkpoint_manager(run.path, keep=keep_checkpoints)
        self.start = iteration  # where this invocation began (a resumed run's first iteration)
        self.iteration_times: list[float] = []
        self.last_record: dict = dict(restored.get("last_record") or {})
        self.last_eval: tuple[int, dict] | None = None  # (iteration, metrics) of the latest evaluation
        self.guard = DivergenceGuard(last_saved=self.manager.latest_step(), unit=self.unit)

    @property
    def step(self) -> int:
        """Optimiser updates done."""
        return self.placed.step

    # -- the loop --------------------------------------------------------------------------
    def run(self, source: Source, evaluate: Callable[[Any], dict]) -> dict:
        """Iterations `self.iteration .. cadence.end - 1`; returns the last record. Raises
        `jaxgpt.engine.preemption.Stopped` after saving when asked to stop."""
        if self.stops is None:
            with StopRequests() as self.stops:
                try:
                    return self.run(source, evaluate)
                finally:
                    self.stops = None
        c, stops = self.cadence, self.stops
        bar = tqdm(total=c.end, initial=self.iteration, desc="rl" if self.rl else "train",
                   disable=not is_main_process(), dynamic_ncols=True, unit="it" if self.rl else "step")
        stops.begin(self.iteration)
        try:
            while self.iteration < c.end:
                self.window.append(self._iterate(source))
                done = self.iteration
                is_eval = done % c.eval_interval == 0 or done == c.end
                if done % c.log_interval == 0 or is_eval:
                    self._log(self.window, evaluate if is_eval else None)
                    self.window = []
                    bar.set_postfix(refresh=False, **{label: f"{self.last_record[key]:.4g}"
                                                      for label, key in self.postfix.items()
                                                      if self.last_record.get(key) is not None})
                bar.update(1)
                stop = stops.should_stop(done)
                if is_eval or (c.checkpoint_interval and done % c.checkpoint_interval == 0) or stop:
                    self.save()
                    stop = stop or stops.should_stop(done)  # asked during the save: this step is saved
                if stop:
                    bar.close()
                    log(stops.describe(done, self.unit, str(self.run_dir.path)))
                    raise stops.stopped()
        finally:
            bar.close()
        return self.last_record

    def _iterate(self, source: Source) -> dict:
        """One iteration: the source's minibatches, one update each; returns its metrics."""
        s = self.iteration
        t0 = time.perf_counter()
        minibatches, stats = source(s, self.placed.local_params)
        t1 = time.perf_counter()
        collected = [self.placed.update(batch, self.keys.dropout) for batch in minibatches]
        jax.block_until_ready(collected[-1]["loss"])
        self.iteration_times.append(time.perf_counter() - t0)
        if self.rl:  # an RL iteration's two phases: the source's rollouts, then the updates
            stats = {**stats, "update_seconds": time.perf_counter() - t1}
        self.iteration = s + 1
        self.guard.record(sum(m["loss"] for m in collected[1:]) + collected[0]["loss"])  # NaN if any is
        return {"stats": stats, "metrics": collected}

    def _log(self, window: list[dict], evaluate: Callable | None) -> None:
        self.guard.check(self.iteration)
        record: dict[str, Any] = {}
        if self.rl:
            record.update(iteration=self.iteration, step=self.step)
        else:
            record["step"] = self.iteration
            if self.throughput is not None:
                record["tokens_seen"] = self.iteration * self.throughput.tokens_per_iteration
        per_iteration = [self._values(w) for w in window]
        for key in dict.fromkeys(k for it in per_iteration for k in it):  # some stats are not every iteration's
            record[key] = float(np.mean([it[key] for it in per_iteration if key in it]))
        if self.lr_at is not None:
            record["lr"] = float(self.lr_at(self.step - 1))
        if self.throughput is not None:
            tps = self.tokens_per_sec()
            record["tokens_per_sec"] = tps
            t = self.throughput
            if t.model_cfg is not None:
                record["mfu"] = mfu(tps, t.model_cfg, t.seq_len, t.num_devices)
        if evaluate is not None:
            self.last_eval = (self.iteration, evaluate(self.placed))
            record.update(self.last_eval[1])
        self.writer.write(record)
        self.last_record = record

    def _values(self, entry: dict) -> dict:
        """An iteration's loggable values: its host stats and the mean of each step metric over
        its updates (fetched from the device once; a restored entry has them already)."""
        if "values" not in entry:
            entry["values"] = {**entry.pop("stats"), **self._mean_metrics(entry.pop("metrics"))}
        return entry["values"]

    def _mean_metrics(self, collected: list[dict]) -> dict:
        """The mean of each step metric over an iteration's updates, renamed by `metric_names`."""
        collected = jax.device_get(collected)
        names = self.metric_names or {k: k for k in collected[0] if k != "count"}
        return {new: float(np.mean([c[old] for c in collected])) for old, new in names.items()}

    # -- results ---------------------------------------------------------------------------
    def tokens_per_sec(self) -> float:
        """Tokens per second of the median iteration after the first (which compiles); with
        no iteration run here (a finished run's outputs written from its checkpoint), the
        last record's."""
        times = self.iteration_times[1:] or self.iteration_times
        if not times:
            return float(self.last_record.get("tokens_per_sec") or float("nan"))
        return self.throughput.tokens_per_iteration / statistics.median(times)

    def seconds_per_iteration(self) -> float:
        times = self.iteration_times[1:] or self.iteration_times
        return statistics.median(times) if times else float("nan")

    def final_eval(self, evaluate: Callable[[Any], dict]) -> dict:
        """`evaluate` of the final params: the loop's own evaluation of the last iteration when
        it made one (evaluations are deterministic)."""
        if self.last_eval is not None and self.last_eval[0] == self.iteration:
            return self.last_eval[1]
        return evaluate(self.placed)

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint iteration `self.iteration` (once), after the NaN check of the losses
        since the last save and of the params."""
        if self.manager.latest_step() == self.iteration:
            return
        state = self.placed.host()
        self.guard.check(self.iteration, state["params"])
        meta = {**self.meta, "iteration": self.iteration, "step": self.step, "seed": self.seed,
                "rng_key_data": np.asarray(jax.random.key_data(self.keys.dropout)).tolist(),
                "window": [self._values(w) for w in self.window],
                "last_record": {k: _plain(v) for k, v in self.last_record.items()}}
        with (self.stops.saving() if self.stops is not None else contextlib.nullcontext()):
            checkpoint.save(self.manager, self.iteration, state, meta)
        self.guard.saved(self.iteration)
