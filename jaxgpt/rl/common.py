"""What `finetune.py grpo` and `finetune.py ppo` share: the rollout config section, the
`RLTask` recipe (experience -> inner epochs of minibatch updates on the shared loop), prompt
padding, and chunked generation for evaluation."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np

from jaxgpt.config import at_least, one_of
from jaxgpt.engine import Recipe, Schedule
from jaxgpt.errors import UserError
from jaxgpt.generation.samplers import SAMPLERS


@dataclass(frozen=True)
class RolloutConfig:
    """`rollout` section: how experience is sampled and how often it is reused."""

    prompts_per_step: int = 16  # prompts per iteration (GRPO samples group_size completions of each)
    max_new_tokens: int = 16  # completion budget; prompt + completion must fit the context
    temperature: float = 1.0  # sampling temperature (> 0); the losses score the tempered policy that sampled
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    sampler: str = "inverse_cdf"  # inverse_cdf (exact, fast on CPU) | gumbel (jax.random.categorical)
    inner_epochs: int = 1  # passes over each experience batch (mu)
    minibatches: int = 1  # optimiser updates per pass
    eval_batch_size: int = 100  # prompts per greedy evaluation call


def validate_rollout_config(r: RolloutConfig) -> None:
    at_least(r, "rollout", 1, "prompts_per_step", "max_new_tokens", "inner_epochs", "minibatches", "eval_batch_size")
    at_least(r, "rollout", 0, "top_k")
    if not r.temperature > 0:
        raise UserError(f"rollout.temperature must be > 0 (RL needs sampled completions), got {r.temperature}")
    one_of(r.sampler, SAMPLERS, "rollout.sampler")
    if not 0.0 < r.top_p <= 1.0:
        raise UserError(f"rollout.top_p must be in (0, 1], got {r.top_p}")


def validate_rollout(r: RolloutConfig, rows: int, devices: int, accum: int) -> None:
    """That each minibatch of `rows` sequences splits over devices x accum."""
    if rows % r.minibatches:
        raise UserError(f"{rows} sequences per iteration do not split into rollout.minibatches={r.minibatches}")
    per = rows // r.minibatches
    if per % (devices * accum):
        raise UserError(f"a minibatch of {per} sequences must be divisible by devices x train.grad_accum_steps "
                        f"= {devices} x {accum}; change rollout.prompts_per_step, rollout.minibatches or "
                        "train.num_devices")


def sampling_kwargs(r: RolloutConfig) -> dict:
    return {"temperature": r.temperature, "top_k": r.top_k or None, "top_p": r.top_p if r.top_p < 1.0 else None,
            "method": r.sampler}


def token_kwargs(tokenizer, model_cfg) -> dict:
    """What every rollout of a model takes from its tokenizer: the ids that end a completion (eos,
    and the chat template's end of an answer where that differs: `Tokenizer.stop_ids`),
    and `vocab_limit` when the embedding has rows the tokenizer never produces (Qwen3: 151,936
    rows, 151,669 ids), which must never be sampled."""
    limit = tokenizer.vocab_size if model_cfg.vocab_size > tokenizer.vocab_size else None
    return {"eos_id": tokenizer.stop_ids, "vocab_limit": limit}


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


class RLTask(Recipe):
    """An RL task: each iteration samples experience from the current policy
    (`experience(iteration, params) -> (batch, stats)`), and its rows make
    `rollout.inner_epochs` x `rollout.minibatches` updates, reshuffled every inner epoch
    (`Keys.shuffle(iteration, epoch)`). Everything random is a function of the run's seed
    and the iteration, so `--resume` continues exactly as if never stopped.

    The reference model is the policy's starting point (`--init`, or the seeded random init),
    rebuilt the same way on `--resume` rather than stored in every checkpoint: frozen plain
    params (`self.ref_params`), passed explicitly to the jitted functions that score rollouts.
    Evaluations (`evaluate_params(params)`) run on one device's copy of the params.
    """

    rl = True
    metric_names = None
    reference_on_resume = True
    postfix = {"reward": "reward", "loss": "loss"}
    group_size = 1  # completions sampled per prompt

    def validate(self) -> None:
        r = self.cfg.rollout
        validate_rollout(r, r.prompts_per_step * self.group_size, self.dp.batch_shards, self.cfg.train.grad_accum_steps)

    def schedule(self) -> Schedule:
        from jaxgpt.tasks.common import schedule_steps

        r, n = self.cfg.rollout, self.num_prompts()
        iterations, eval_interval = schedule_steps(self.cfg, n // r.prompts_per_step)
        if iterations == 0:
            raise UserError(f"{n} training prompts, fewer than rollout.prompts_per_step={r.prompts_per_step}; lower it")
        return Schedule(iterations, eval_interval, updates_per_iteration=r.inner_epochs * r.minibatches)

    def num_prompts(self) -> int:
        raise NotImplementedError

    def prepare(self, params, meta: dict) -> None:
        self.ref_params = self.dp.put_local(jax.device_get(plain_params(params, self.cfg)))  # its own copy, placed once

    def loss_fn(self, model):
        self.model = model  # the policy (LoRA adapters, a value head): what rescoring runs
        return self.policy_loss_fn(model)

    def experience(self, iteration: int, params) -> tuple[dict, dict]:
        raise NotImplementedError

    def source(self, iteration, local_params):
        batch, stats = self.experience(iteration, local_params())
        r = self.cfg.rollout
        rows = len(next(iter(batch.values())))
        size = rows // r.minibatches
        parts = []
        for epoch in range(r.inner_epochs):
            order = np.asarray(jax.random.permutation(self.keys.shuffle(iteration, epoch), rows))
            parts += [take_rows(batch, order[m * size:(m + 1) * size]) for m in range(r.minibatches)]
        return parts, stats

    def evaluate(self, placed) -> dict:
        return self.evaluate_params(placed.local_params())

    def evaluate_before(self, placed) -> dict:
        return self.evaluate(placed)

    def summary(self, loop, before: dict, final: dict) -> dict:
        from jaxgpt.engine.metrics import read_jsonl

        self.records = read_jsonl(self.run.metrics_jsonl)
        self.trained = [rec for rec in self.records if "reward" in rec]
        tokens_per_sec = [rec["rollout_tokens_per_sec"] for rec in self.trained]
        return {"init": self.cfg.finetune.init, "train_mode": self.cfg.finetune.train_mode,
                **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in final.items()},
                "rollout_tokens_per_sec": float(np.median(tokens_per_sec)) if tokens_per_sec else None,
                "seconds_per_iteration": loop.seconds_per_iteration()}

    def first_last(self, key: str) -> tuple:
        return (self.trained[0][key], self.trained[-1][key]) if self.trained else (None, None)


def plain_params(params, cfg, drop: Sequence[str] = ("value_head",)):
    """The GPT params the sampler and the reward/reference code read: LoRA merged (lora mode),
    extra heads dropped."""
    from jaxgpt.models.lora import has_lora, merge_lora

    params = {k: v for k, v in params.items() if k not in drop}
    if has_lora(params):  # merged on the host (merge_lora is numpy): small next to a rollout
        params = merge_lora(jax.device_get(params), cfg.lora)
    return params


def generate_all(params, model_cfg, tokens: np.ndarray, mask: np.ndarray, key, *, batch: int, group_size: int = 1,
                 **kwargs) -> list[dict]:
    """`rollout` (`group_size` samples a prompt, prompt i's adjacent) over all prompts in
    chunks of `batch` prompts; the last chunk is padded with copies of its first prompt so
    every call has one shape. Returns host dicts trimmed to the real prompts' rows."""
    from jaxgpt.rl.rollout import rollout

    outs = []
    for start in range(0, len(tokens), batch):
        t, m = tokens[start:start + batch], mask[start:start + batch]
        real = len(t)
        if real < batch:
            t = np.concatenate([t, np.repeat(t[:1], batch - real, 0)])
            m = np.concatenate([m, np.repeat(m[:1], batch - real, 0)])
        out = jax.device_get(rollout(params, model_cfg, t, m, jax.random.fold_in(key, start), group_size=group_size,
                                     **kwargs))
        outs.append({k: np.asarray(v)[:real * group_size] for k, v in out.items()})
    return outs


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


__all__ = ["RLTask", "RolloutConfig", "Timer", "generate_all", "plain_params", "prompt_indices",
           "sampling_kwargs", "take_rows", "token_kwargs", "validate_rollout"]
