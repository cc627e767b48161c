"""`finetune.py grpo`: GRPO with verifiable rewards (`jaxgpt.rl.tasks`: arithmetic, gsm8k).

Each iteration takes `rollout.prompts_per_step` problems of the task's RL split, samples
`grpo.group_size` completions of each (one jitted call, `jaxgpt.rl.rollout`), rewards each
completion 1/0 by the task's strict verifier, turns rewards into group-normalised
advantages, scores the completions under the frozen reference model, and makes
`rollout.inner_epochs x rollout.minibatches` updates with the clipped GRPO loss
(`jaxgpt.rl.grpo`) through the shared, pmapped train step. Prompts are the Alpaca format
(`jaxgpt.text.prompts.format_prompt`, instruction = the question), as in `finetune.py instruct
--task NAME`, whose run is the usual `--init`.

Evaluation: greedy accuracy on the task's held-out eval split before training
(`eval_accuracy_before`), at every eval point, and at the end (`eval_accuracy_after`).
Run directory: config.yaml, metrics.jsonl (per logged iteration: reward, accuracy of the
sampled completions, format rate, completion length, loss, clip_frac, kl_ref (sequence KL
to the reference), kl (the loss's k3, when grpo.kl_beta > 0), ratio, grad_norm, lr,
rollout tokens/s, timings; eval_* at eval points, with
eval_step_accuracy for arithmetic: the fraction of eval completions whose worked line i is
exactly right (`step_rewards`), then the answer, so a run shows which step RL improved),
metrics.json, reward.png, kl.png, eval_samples.jsonl (the final greedy completions), checkpoints/.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import jax
import numpy as np

from jaxgpt.engine import Plot
from jaxgpt.engine.driver import train
from jaxgpt.errors import UserError
from jaxgpt.models import build_model
from jaxgpt.config import at_least, one_of
from jaxgpt.rl.common import (RLTask, RolloutConfig, Timer, plain_params, prompt_indices, sampling_kwargs,
                              validate_rollout_config)
from jaxgpt.rl.grpo import LOSS_AGGREGATIONS
from jaxgpt.rl.prompt_sets import load_task_data, token_newlines
from jaxgpt.rl.rollout import completion_logprobs, completion_texts, rollout
from jaxgpt.tasks import default_config
from jaxgpt.tasks.common import TaskConfig
from jaxgpt.io.files import atomic_write

DEFAULT_CONFIG = default_config("grpo")
SUPERVISION = ("outcome", "process", "auto")


@dataclass(frozen=True)
class RLDataConfig:
    """`data` section: the verifiable task and its prompts."""

    task: str = "arithmetic"  # --task: arithmetic[:digits=1,operands=3,ops=+-,style=chain] | gsm8k[:path=FILE]
    path: str = ""  # --data: the gsm8k JSONL file ("" = bundled gsm8k-test); must be "" for arithmetic
    seed: int = 0  # which problems of each split, and the prompt order
    eval_size: int = 500  # held-out problems scored at evals; 0 = the whole eval split
    max_prompt_tokens: int = 0  # longer prompts are dropped; 0 = keep all (P = the longest)


@dataclass(frozen=True)
class GRPOSection:
    group_size: int = 8  # G completions per prompt
    clip_eps: float = 0.2  # ratio clipped to [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float = 0.0  # 0 = clip_eps (DAPO's clip-higher uses e.g. 0.28)
    kl_beta: float = 0.0  # weight of the k3 KL penalty to the reference
    loss_agg: str = "sequence"  # sequence (GRPO paper) | token (DAPO)
    normalize_std: bool = True  # divide advantages by the group's reward std (outcome supervision)
    supervision: str = "outcome"  # outcome | process (per-line rewards, arithmetic) | auto (process when the task has it)


@dataclass(frozen=True)
class GRPOConfig(TaskConfig):
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)


def validate_grpo(g: GRPOSection) -> None:
    if g.group_size < 2:
        raise UserError(f"grpo.group_size must be >= 2 (advantages compare completions of a prompt), got {g.group_size}")
    if not g.clip_eps > 0:
        raise UserError(f"grpo.clip_eps must be > 0, got {g.clip_eps}")
    at_least(g, "grpo", 0, "clip_eps_high", "kl_beta")
    one_of(g.supervision, SUPERVISION, "grpo.supervision")
    one_of(g.loss_agg, LOSS_AGGREGATIONS, "grpo.loss_agg")


def is_on_policy(r) -> bool:
    """One update per batch of rollouts, made with the params that sampled it."""
    return r.inner_epochs * r.minibatches == 1


class GRPO(RLTask):
    name = "grpo"
    config_class = GRPOConfig
    plots = (Plot("reward.png", "iteration", ("reward", "eval_accuracy"), "reward / accuracy"),
             Plot("kl.png", "iteration", ("kl_ref", "clip_frac"), "KL to reference / clip fraction"))

    @property
    def group_size(self) -> int:
        return self.cfg.grpo.group_size

    @staticmethod
    def validate_config(cfg) -> None:
        from jaxgpt.rl.tasks import get_task

        g, d = cfg.grpo, cfg.data
        validate_grpo(g)
        validate_rollout_config(cfg.rollout)
        at_least(d, "data", 0, "seed", "eval_size", "max_prompt_tokens")
        task = get_task(d.task, d.path)
        if g.supervision == "process" and not hasattr(task, "step_rewards"):
            raise UserError(f"task {d.task} has no process rewards; set grpo.supervision=outcome (or auto)")

    def load_data(self) -> None:
        self.data = load_task_data(self.cfg, self.tokenizer)

    def num_prompts(self) -> int:
        return len(self.data.problems["rl"])

    def describe(self) -> str:
        d, r = self.data, self.cfg.rollout
        return (f"task {self.cfg.data.task}: {len(d.problems['rl'])} RL / {len(d.problems['eval'])} eval prompts "
                f"(dropped as too long: {d.dropped['rl']} / {d.dropped['eval']}) | {r.prompts_per_step} prompts x "
                f"{self.group_size} samples")

    def policy_loss_fn(self, model):
        from jaxgpt.rl.grpo import grpo_loss_fn

        g, r = self.cfg.grpo, self.cfg.rollout
        n, temp = r.max_new_tokens, r.temperature
        ref_model = build_model(self.cfg.model)
        self.ref_logprobs = jax.jit(lambda ref, t, m: completion_logprobs(ref_model, ref, t, m, n, temperature=temp))
        # The sampler's log-probs are untempered: at T != 1 the tempered policy rescores its samples.
        self.policy_logprobs = jax.jit(lambda p, t, m: completion_logprobs(model, p, t, m, n, temperature=temp))
        self.process = g.supervision == "process" or (g.supervision == "auto" and hasattr(self.data.task, "step_rewards"))
        self.newlines = token_newlines(self.tokenizer) if self.process else None
        return grpo_loss_fn(model, clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high or None, kl_beta=g.kl_beta,
                            loss_agg=g.loss_agg, temperature=temp, on_policy=is_on_policy(r))

    def experience(self, iteration: int, params) -> tuple[dict, dict]:
        from jaxgpt.rl.grpo import group_advantages, process_advantages

        cfg, data = self.cfg, self.data
        r, g, n = cfg.rollout, cfg.grpo, cfg.rollout.max_new_tokens
        problems = data.problems["rl"]
        idx = prompt_indices(iteration, r.prompts_per_step, len(problems), cfg.data.seed)
        with Timer() as timer:
            out = rollout(plain_params(params, cfg), cfg.model, data.tokens["rl"][idx], data.masks["rl"][idx],
                          self.keys.rollout(iteration), group_size=g.group_size, max_new_tokens=n,
                          eos_id=self.tokenizer.eos_id, **sampling_kwargs(r))
            out = jax.device_get(out)
        texts = completion_texts(out, self.tokenizer.eos_id, self.tokenizer)
        rows = [problems[i] for i in np.repeat(idx, g.group_size)]
        rewards = np.array([data.task.reward(t, p) for t, p in zip(texts, rows)], np.float32)
        answered = np.array([data.task.extract(t) is not None for t in texts], np.float32)
        if self.process:
            steps = np.array([data.task.step_rewards(t, p) for t, p in zip(texts, rows)], np.float32)
            newlines = self.newlines[out["tokens"][:, -n:]]
            segments = np.cumsum(newlines, axis=1) - newlines  # the line each token starts on
            advantages = np.asarray(process_advantages(steps, segments, g.group_size))
        else:
            advantages = np.asarray(group_advantages(rewards, g.group_size, normalize_std=g.normalize_std))
        mask = out["completion_mask"].astype(np.float32)
        # The reference is scored when the loss needs it, else only on logged iterations (kl_ref);
        # the tempered policy is rescored for the loss's old log-probs unless on-policy, and for kl_ref.
        logged = (iteration + 1) % cfg.train.log_interval == 0
        if r.temperature != 1.0 and (logged or not is_on_policy(r)):
            out["logprobs"] = np.asarray(self.policy_logprobs(params, out["tokens"], out["attention_mask"])) * mask
        ref = (np.asarray(self.ref_logprobs(self.ref_params, out["tokens"], out["attention_mask"])) * mask
               if g.kl_beta > 0 or logged else out["logprobs"])
        batch = {"tokens": out["tokens"], "attention_mask": out["attention_mask"],
                 "completion_mask": out["completion_mask"], "old_logprobs": out["logprobs"],
                 "ref_logprobs": ref, "advantages": advantages}
        groups = rewards.reshape(-1, g.group_size)
        stats = {"reward": float(rewards.mean()), "format_rate": float(answered.mean()),
                 "completion_len": float(out["lengths"].mean()),
                 "groups_all_correct": float(np.mean(groups.min(1) == 1.0)),
                 "groups_all_wrong": float(np.mean(groups.max(1) == 0.0)),
                 "rollout_tokens_per_sec": float(out["lengths"].sum() / timer.seconds),
                 "rollout_seconds": timer.seconds}
        if logged:  # the sequence-level KL(policy || reference) estimate, sum_t (logp - ref)
            stats["kl_ref"] = float(np.mean(np.sum((out["logprobs"] - ref) * mask, axis=1)))
        return batch, stats

    def evaluate_params(self, params) -> dict:
        """Greedy accuracy on the held-out split (+ format rate, length, per-line accuracy)."""
        from jaxgpt.rl import common

        data = self.data
        outs = common.generate_all(plain_params(params, self.cfg), self.cfg.model, data.tokens["eval"],
                                   data.masks["eval"], self.keys.sample,
                                   batch=min(self.cfg.rollout.eval_batch_size, len(data.tokens["eval"])),
                                   max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=0.0, eos_id=self.tokenizer.eos_id)
        self.eval_texts = texts = [t for out in outs for t in completion_texts(out, self.tokenizer.eos_id, self.tokenizer)]
        probs = data.problems["eval"]
        metrics = {"eval_accuracy": float(np.mean([data.task.reward(t, p) for t, p in zip(texts, probs)])),
                   "eval_format_rate": float(np.mean([data.task.extract(t) is not None for t in texts])),
                   "eval_completion_len": float(np.mean(np.concatenate([out["lengths"] for out in outs])))}
        if hasattr(data.task, "step_rewards"):  # which worked line goes wrong: [line 1, line 2, ..., answer]
            steps = np.array([data.task.step_rewards(t, p) for t, p in zip(texts, probs)], np.float64)
            metrics["eval_step_accuracy"] = [round(float(v), 4) for v in steps.mean(0)]
        return metrics

    def summary(self, loop, before: dict, final: dict) -> dict:
        out = super().summary(loop, before, final)
        first, last = self.first_last("reward")
        return {"task": self.cfg.data.task, **out, "reward_first": first, "reward_last": last,
                "kl": next((rec["kl_ref"] for rec in reversed(self.trained) if "kl_ref" in rec), None),
                "num_prompts": {"rl": len(self.data.problems["rl"]), "eval": len(self.data.problems["eval"])}}

    def done_line(self, s: dict) -> str:
        return f"eval accuracy {s['eval_accuracy_before']:.4f} -> {s['eval_accuracy_after']:.4f}"

    def write_outputs(self, loop, summary: dict) -> None:
        atomic_write(self.run.path / "eval_samples.jsonl", "".join(
            json.dumps({"question": p.question, "answer": p.answer, "completion": text,
                        "reward": self.data.task.reward(text, p)}) + "\n"
            for p, text in zip(self.data.problems["eval"], self.eval_texts)))


RECIPE = GRPO


# The Python entry point: finetune_grpo(cfg, out_dir=None, *, resume=False, stop_after=None) -> metrics.json summary
finetune_grpo = functools.partial(train, GRPO)
