"""`finetune.py grpo`: the GRPO family with verifiable rewards (`jaxgpt.rl.tasks`: arithmetic, gsm8k).

Each iteration takes `rollout.prompts_per_step` problems of the task's RL split, samples
`grpo.group_size` completions of each (one jitted call, `jaxgpt.rl.rollout`), rewards each
completion by the task's verifier (strict for arithmetic, the math verifier for gsm8k),
turns rewards into group-relative advantages and makes `rollout.inner_epochs x
rollout.minibatches` updates with the variant's loss (`grpo.loss_type`: grpo, dr_grpo,
dapo, gspo, cispo; `jaxgpt.rl.grpo_variants` resolves the knobs, `jaxgpt.rl.grpo` has the
math) through the shared, pmapped train step. Dynamic sampling and overlong shaping are in
`jaxgpt.rl.grpo_experience`. The frozen reference model is kept and scored only when
`grpo.kl_beta > 0` or `grpo.log_kl`. Prompts are the model's format (`jaxgpt.text.prompts`:
its chat template, else Alpaca; instruction = the question), as in `finetune.py instruct
--task NAME`, whose run is the usual `--init`.

Evaluation (`jaxgpt.rl.evaluation`, the same as `python -m jaxgpt evaluate`): greedy accuracy,
format rate, completion length (and per-line accuracy for arithmetic) on the held-out split
before training, at every eval point and at the end; with `data.eval_samples` K > 0, pass@1..K
of K samples a problem before and after (`eval_pass_at_k_before` / `_after`).
Run directory: config.yaml, metrics.jsonl (per logged iteration: reward, format rate and
completion length of the sampled completions, truncated_frac, groups_all_correct /
groups_all_wrong, with dynamic sampling groups_dropped / groups_unfilled / sampling_tries,
overlong_penalty, loss, pg_loss, clip_frac, ratio, kl (the loss's k3, kl_beta > 0), kl_ref
(sequence KL to the reference, grpo.log_kl), grad_norm, lr, rollout tokens/s, timings; eval_*
at eval points), metrics.json, reward.png, length.png, kl.png, eval_samples.jsonl (the final
greedy completions), checkpoints/.
"""
from __future__ import annotations

import dataclasses
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
from jaxgpt.rl.common import RLTask, RolloutConfig, plain_params, validate_rollout_config
from jaxgpt.rl.prompt_sets import load_task_data, token_newlines
from jaxgpt.rl.rollout import completion_logprobs
from jaxgpt.tasks import default_config
from jaxgpt.tasks.common import TaskConfig
from jaxgpt.io.files import atomic_write

DEFAULT_CONFIG = default_config("grpo")
SUPERVISION = ("outcome", "process", "auto")


@dataclass(frozen=True)
class RLDataConfig:
    """`data` section: the verifiable task, its prompts, and the evaluation before/after."""

    task: str = "arithmetic"  # --task: arithmetic[:digits=1,operands=3,ops=+-,style=chain] | gsm8k[:path=FILE]
    path: str = ""  # --data: the gsm8k JSONL or parquet file ("" = bundled gsm8k-test); must be "" for arithmetic
    seed: int = 0  # which problems of each split, and the prompt order
    eval_size: int = 500  # held-out problems scored at evals; 0 = the whole eval split
    max_prompt_tokens: int = 0  # longer prompts are dropped; 0 = keep all (P = the longest)
    eval_samples: int = 0  # K sampled completions a held-out problem before and after training: pass@1..K; 0 = off
    eval_temperature: float = 0.6  # their sampling temperature (> 0)


@dataclass(frozen=True)
class GRPOSection:
    """`grpo` section: the variant by name and the knobs under it (null: the variant's value,
    `jaxgpt.rl.grpo_variants`), the KL term, dynamic sampling, overlong handling."""

    loss_type: str = "grpo"  # grpo | dr_grpo | dapo | gspo | cispo
    group_size: int = 8  # G completions per prompt
    loss_agg: str | None = None  # sequence (GRPO) | token (DAPO) | constant (Dr. GRPO: / completions x max_new_tokens)
    scale_rewards: str | None = None  # group | batch | none: what divides the centred rewards
    clip_eps: float | None = None  # epsilon_low: the weight clipped to [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = None  # epsilon_high (DAPO's clip-higher 0.28); 0 = clip_eps
    ratio_level: str | None = None  # token | sequence (GSPO: one importance weight a completion)
    kl_beta: float = 0.0  # weight of the k3 KL penalty to the reference (0: no reference model at all)
    log_kl: bool = False  # score the reference on logged iterations for kl_ref even when kl_beta is 0
    dynamic_sampling: bool | None = None  # drop groups whose rewards are all equal, refill from new prompts
    max_sampling_tries: int = 4  # rollouts an iteration may take to fill the batch with informative groups
    overlong: str | None = None  # none | mask (truncated completions out of the loss) | penalty (DAPO's soft one)
    overlong_buffer: int = 0  # the penalty's ramp, tokens before rollout.max_new_tokens; 0 = 20% of it
    overlong_penalty: float = 1.0  # the penalty at the budget
    normalize_std: bool | None = None  # the earlier spelling of scale_rewards (true: group, false: none)
    supervision: str = "outcome"  # outcome | process (per-line rewards, arithmetic) | auto (process when the task has it)


@dataclass(frozen=True)
class GRPOConfig(TaskConfig):
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)


def validate_grpo(g: GRPOSection, max_new_tokens: int):
    """The resolved `LossSettings`, or UserError (before anything is written)."""
    from jaxgpt.rl.grpo_variants import resolve

    if g.group_size < 2:
        raise UserError(f"grpo.group_size must be >= 2 (advantages compare completions of a prompt), got {g.group_size}")
    one_of(g.supervision, SUPERVISION, "grpo.supervision")
    return resolve(g, max_new_tokens)


def is_on_policy(r) -> bool:
    """One update per batch of rollouts, made with the params that sampled it."""
    return r.inner_epochs * r.minibatches == 1


class GRPO(RLTask):
    name = "grpo"
    config_class = GRPOConfig
    plots = (Plot("reward.png", "iteration", ("reward", "eval_accuracy"), "reward / accuracy"),
             Plot("length.png", "iteration", ("completion_len",), "completion tokens"),
             Plot("kl.png", "iteration", ("kl_ref", "kl", "clip_frac"), "KL to reference / clip fraction"))

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.settings = validate_grpo(cfg.grpo, cfg.rollout.max_new_tokens)

    @property
    def group_size(self) -> int:
        return self.cfg.grpo.group_size

    @staticmethod
    def validate_config(cfg) -> None:
        from jaxgpt.rl.tasks import get_task

        g, d = cfg.grpo, cfg.data
        validate_grpo(g, cfg.rollout.max_new_tokens)
        validate_rollout_config(cfg.rollout)
        at_least(d, "data", 0, "seed", "eval_size", "max_prompt_tokens", "eval_samples")
        if not d.eval_temperature > 0:
            raise UserError(f"data.eval_temperature must be > 0 (pass@k samples), got {d.eval_temperature}")
        task = get_task(d.task, d.path)
        if g.supervision == "process" and not hasattr(task, "step_rewards"):
            raise UserError(f"task {d.task} has no process rewards; set grpo.supervision=outcome (or auto)")

    def load_data(self) -> None:
        self.data = load_task_data(self.cfg, self.tokenizer)

    def num_prompts(self) -> int:
        return len(self.data.problems["rl"])

    def describe(self) -> str:
        d, r, s = self.data, self.cfg.rollout, self.settings
        return (f"task {self.cfg.data.task}: {len(d.problems['rl'])} RL / {len(d.problems['eval'])} eval prompts "
                f"(dropped as too long: {d.dropped['rl']} / {d.dropped['eval']}) | {r.prompts_per_step} prompts x "
                f"{self.group_size} samples | loss {s.loss_type}")

    def prepare(self, params, meta: dict) -> None:
        if self.settings.needs_reference:  # kl_beta 0 and no kl_ref wanted: no reference at all
            super().prepare(params, meta)

    def policy_loss_fn(self, model):
        from jaxgpt.rl.grpo import grpo_loss_fn

        g, r, s = self.cfg.grpo, self.cfg.rollout, self.settings
        n, temp = r.max_new_tokens, r.temperature
        if s.needs_reference:
            ref_model = build_model(self.cfg.model)
            self.ref_logprobs = jax.jit(lambda ref, t, m: completion_logprobs(ref_model, ref, t, m, n, temperature=temp))
        # The sampler's log-probs are untempered: at T != 1 the tempered policy rescores its samples.
        self.policy_logprobs = jax.jit(lambda p, t, m: completion_logprobs(model, p, t, m, n, temperature=temp))
        self.process = g.supervision == "process" or (g.supervision == "auto" and hasattr(self.data.task, "step_rewards"))
        self.newlines = token_newlines(self.tokenizer) if self.process else None
        return grpo_loss_fn(model, clip_eps=s.clip_eps, clip_eps_high=s.clip_eps_high, kl_beta=s.kl_beta,
                            loss_agg=s.loss_agg, temperature=temp, on_policy=is_on_policy(r),
                            ratio_level=s.ratio_level, form=s.form, loss_constant=float(n))

    def experience(self, iteration: int, params) -> tuple[dict, dict]:
        from jaxgpt.rl.grpo_experience import sample_groups

        cfg, r, s = self.cfg, self.cfg.rollout, self.settings
        batch, out, stats = sample_groups(self, iteration, plain_params(params, cfg))
        mask = out["completion_mask"].astype(np.float32)
        # The reference is scored when the loss needs it, else on logged iterations with grpo.log_kl
        # (kl_ref); the tempered policy is rescored for the loss's old log-probs unless on-policy, and for kl_ref.
        logged = (iteration + 1) % cfg.train.log_interval == 0
        kl_ref = s.log_kl and logged
        if r.temperature != 1.0 and (kl_ref or not is_on_policy(r)):
            out["logprobs"] = np.asarray(self.policy_logprobs(params, out["tokens"], out["attention_mask"])) * mask
        batch["old_logprobs"] = out["logprobs"]
        if s.kl_beta > 0 or kl_ref:
            ref = np.asarray(self.ref_logprobs(self.ref_params, out["tokens"], out["attention_mask"])) * mask
            if s.kl_beta > 0:
                batch["ref_logprobs"] = ref
            if kl_ref:  # the sequence-level KL(policy || reference) estimate, sum_t (logp - ref)
                stats["kl_ref"] = float(np.mean(np.sum((out["logprobs"] - ref) * mask, axis=1)))
        return batch, stats

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate_params(self, params, samples: int = 0) -> dict:
        """Greedy accuracy on the held-out split (+ format rate, length, per-line accuracy);
        with `samples`, pass@1..samples of that many completions a problem (`jaxgpt.rl.evaluation`)."""
        from jaxgpt.rl.evaluation import evaluate_policy

        data, d = self.data, self.cfg.data
        metrics, self.eval_texts = evaluate_policy(
            plain_params(params, self.cfg), self.cfg.model, data.task, data.problems["eval"], data.tokens["eval"],
            data.masks["eval"], self.keys.sample, samples=samples, temperature=d.eval_temperature,
            batch=self.cfg.rollout.eval_batch_size, max_new_tokens=self.cfg.rollout.max_new_tokens, tokenizer=self.tokenizer)
        return {f"eval_{k}": v for k, v in metrics.items()}

    def evaluate_before(self, placed) -> dict:
        return self.evaluate_params(placed.local_params(), self.cfg.data.eval_samples)

    def final(self, loop) -> dict:
        final = loop.final_eval(self.evaluate)
        samples = self.cfg.data.eval_samples
        if samples:  # pass@k after training, as before it
            from jaxgpt.rl.evaluation import evaluate_policy

            data = self.data
            sampled, _ = evaluate_policy(
                plain_params(loop.placed.local_params(), self.cfg), self.cfg.model, data.task, data.problems["eval"],
                data.tokens["eval"], data.masks["eval"], self.keys.sample, samples=samples,
                temperature=self.cfg.data.eval_temperature, batch=self.cfg.rollout.eval_batch_size,
                max_new_tokens=self.cfg.rollout.max_new_tokens, tokenizer=self.tokenizer, greedy=False)
            final = {**final, **{f"eval_{k}": v for k, v in sampled.items()}}
        return final

    def summary(self, loop, before: dict, final: dict) -> dict:
        out = super().summary(loop, before, final)
        first, last = self.first_last("reward")
        s = self.settings
        return {"task": self.cfg.data.task, "loss_type": s.loss_type, "grpo_settings": dataclasses.asdict(s), **out,
                "reward_first": first, "reward_last": last,
                "kl": next((rec["kl_ref"] for rec in reversed(self.trained) if "kl_ref" in rec), None),
                "groups_dropped_per_iteration": (float(np.mean([rec.get("groups_dropped", 0.0) for rec in self.trained]))
                                                 if self.trained and s.dynamic_sampling else None),
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
