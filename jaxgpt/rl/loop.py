"""The RL training loop shared by GRPO and PPO: experience -> inner epochs of updates.

`jaxgpt.trainer.TrainLoop` assumes the batch of step s is a pure function of s. In RL the
batch of iteration s is made *by the current policy*, so this loop owns the order:

    for iteration s:
        batch, stats = make_experience(s, policy_params)     # rollouts, rewards, advantages,
                                                             # reference log-probs (one device, jitted)
        for epoch in range(inner_epochs):                    # mu in the GRPO paper
            for each of `minibatches` shuffled slices:       # the shuffle: fold_in(key, s, epoch)
                state, metrics = p_train(state, slice, key)  # DataParallel's compiled train_step

It reuses the shared pieces: `RunDir`, `Keys`, `MetricsWriter`, Orbax checkpoints (params,
optimiser state, step; the iteration and the pre-training eval in the JSON meta), the
progress bar, Ctrl-C (save and exit) and the NaN check. Everything random is a function of
the run's seed and the iteration (`Keys.sample` split into a rollout and a shuffle stream,
each folded with the iteration), so `--resume` continues exactly as if never stopped.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxgpt import checkpoint
from jaxgpt.errors import UserError
from jaxgpt.metrics import MetricsWriter
from jaxgpt.parallel import DataParallel
from jaxgpt.steps import TrainState, train_step
from jaxgpt.trainer import Keys, RunDir, deferred_interrupt, is_main_process, save_when_due


@dataclass(frozen=True)
class RLStreams:
    """PRNG streams of an RL run: `rollout(s)` samples iteration s's completions,
    `shuffle(s, epoch)` orders its minibatches."""

    rollout_root: jax.Array
    shuffle_root: jax.Array

    @classmethod
    def from_keys(cls, keys: Keys) -> "RLStreams":
        rollout_root, shuffle_root = jax.random.split(keys.sample)
        return cls(rollout_root, shuffle_root)

    def rollout(self, iteration: int) -> jax.Array:
        return jax.random.fold_in(self.rollout_root, iteration)

    def shuffle(self, iteration: int, epoch: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.shuffle_root, iteration), epoch)


def prompt_indices(iteration: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Indices of iteration `iteration`'s `batch` prompts among `n`: a fresh seeded
    permutation every pass over the prompts (the incomplete tail of a pass is skipped)."""
    per_pass = n // batch
    if per_pass == 0:
        raise UserError(f"{batch} prompts per step but only {n} prompts; lower rollout.prompts_per_step")
    epoch, j = divmod(iteration, per_pass)
    return np.random.default_rng([seed, epoch]).permutation(n)[j * batch:(j + 1) * batch]


def take_rows(batch: dict, index) -> dict:
    return {k: np.asarray(v)[index] for k, v in batch.items()}


class RLLoop:
    """Runs iterations of experience + updates with logging, evals and checkpoints.

    state: the initial (or restored) TrainState; `iteration`: where to start (the restored
    meta's); `meta`: extra JSON saved with every checkpoint (e.g. the pre-training eval)."""

    def __init__(self, *, cfg, run: RunDir, dp: DataParallel, state: TrainState, tx, loss_fn, keys: Keys,
                 inner_epochs: int, minibatches: int, iteration: int = 0, meta: dict | None = None, labels=None):
        self.cfg, self.run, self.dp, self.keys = cfg, run, dp, keys
        self.streams = RLStreams.from_keys(keys)
        self.state = dp.replicate(state)
        self.p_train = dp.compile_train_step(train_step, loss_fn=loss_fn, tx=tx, labels=labels)
        self.inner_epochs, self.minibatches = inner_epochs, minibatches
        self.iteration = iteration
        self.meta = dict(meta or {})
        self.writer = MetricsWriter(run.metrics_jsonl, enabled=is_main_process())
        self.manager = checkpoint.checkpoint_manager(run.path, keep=cfg.train.keep_checkpoints)
        self.iteration_times: list[float] = []
        self._eval_at: tuple[int, dict] | None = None  # (iteration, metrics) of the latest eval

    @property
    def step(self) -> int:
        """Optimiser updates done."""
        return int(self.dp.first(self.state.step))

    def policy_params(self):
        """The current params on one device (device 0's replica), for rollouts and evals."""
        return self.dp.first(self.state.params)

    def host_state(self) -> dict:
        state = self.dp.unreplicate(self.state)
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state}

    def save(self) -> None:
        if self.manager.latest_step() == self.iteration:
            return
        meta = {**self.meta, "iteration": self.iteration, "step": self.step, "seed": self.cfg.train.seed,
                "rng_key_data": np.asarray(jax.random.key_data(self.keys.sample)).tolist()}
        checkpoint.save(self.manager, self.iteration, self.host_state(), meta)

    def update(self, batch: dict, iteration: int) -> dict:
        """`inner_epochs` x `minibatches` optimiser updates on one experience batch; returns
        the metrics averaged over them (device 0's, psum'd)."""
        rows = len(next(iter(batch.values())))
        size = rows // self.minibatches
        accum = self.cfg.train.grad_accum_steps
        collected: list[dict] = []
        for epoch in range(self.inner_epochs):
            order = np.asarray(jax.random.permutation(self.streams.shuffle(iteration, epoch), rows))
            for m in range(self.minibatches):
                part = take_rows(batch, order[m * size:(m + 1) * size])
                self.state, metrics = self.p_train(self.state, self.dp.shard_train(part, accum), self.keys.dropout)
                collected.append(self.dp.first(metrics))
        collected = jax.device_get(collected)
        return {k: float(np.mean([c[k] for c in collected])) for k in collected[0] if k != "count"}

    def train(self, total: int, make_experience: Callable[[int, Any], tuple[dict, dict]],
              evaluate: Callable[[Any], dict], eval_interval: int, lr_at: Callable[[int], float] | None = None,
              stop_after: int | None = None) -> dict:
        """Iterations `self.iteration .. total - 1` (or up to `stop_after`, as if interrupted).
        Returns the last logged record."""
        t = self.cfg.train
        end = min(total, stop_after) if stop_after else total
        last: dict = {}
        window: list[dict] = []
        bar = tqdm(total=end, initial=self.iteration, desc="rl", disable=not is_main_process(),
                   dynamic_ncols=True, unit="it")
        with deferred_interrupt() as interrupted:
            try:
                while self.iteration < end:
                    s = self.iteration
                    t0 = time.perf_counter()
                    batch, stats = make_experience(s, self.policy_params())
                    t1 = time.perf_counter()
                    metrics = self.update(batch, s)
                    self.iteration = done = s + 1
                    self.iteration_times.append(time.perf_counter() - t0)
                    window.append({**stats, **metrics, "rollout_seconds": t1 - t0,
                                   "update_seconds": time.perf_counter() - t1})
                    if not np.isfinite(metrics["loss"]):
                        raise UserError(f"training diverged: loss is {metrics['loss']} at iteration {done}; lower "
                                        "train.lr (no checkpoint was written for it)")
                    is_eval = done % eval_interval == 0 or done == end
                    if done % t.log_interval == 0 or is_eval:
                        keys = dict.fromkeys(k for w in window for k in w)  # some stats are not every iteration's
                        record = {"iteration": done, "step": self.step,
                                  **{k: float(np.mean([w[k] for w in window if k in w])) for k in keys}}
                        window = []
                        if lr_at is not None:
                            record["lr"] = float(lr_at(self.step - 1))
                        if is_eval:
                            self._eval_at = (done, evaluate(self.policy_params()))
                            record.update(self._eval_at[1])
                        self.writer.write(record)
                        last = record
                        bar.set_postfix(reward=f"{record.get('reward', float('nan')):.3f}",
                                        loss=f"{record['loss']:.3f}", refresh=False)
                    bar.update(1)
                    save_when_due(self.save, done, is_eval, t.checkpoint_interval, interrupted["flag"],
                                  f"iteration {done}", self.run.path)
            finally:
                bar.close()
        return last

    def final_eval(self, evaluate: Callable[[Any], dict]) -> dict:
        """`evaluate` of the current policy: the loop's own eval of the last iteration when it
        made one (evals are deterministic, and one costs about as much as several iterations)."""
        if self._eval_at is not None and self._eval_at[0] == self.iteration:
            return self._eval_at[1]
        return evaluate(self.policy_params())

    def seconds_per_iteration(self) -> float:
        times = self.iteration_times[1:] or self.iteration_times  # the first compiles
        return statistics.median(times) if times else float("nan")


def restore(run: RunDir, state: TrainState) -> tuple[TrainState, dict]:
    """`(state, meta)` of the run's latest checkpoint, into `state`'s structure."""
    target = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    restored, meta = checkpoint.restore(run.path, target=target)
    return TrainState(**restored), dict(meta or {})


__all__ = ["RLLoop", "RLStreams", "prompt_indices", "restore", "take_rows"]
