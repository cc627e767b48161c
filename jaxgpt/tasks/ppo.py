"""`finetune.py ppo`: RLHF with PPO against a frozen reward model (`finetune.py reward`).

Each iteration samples one completion for each of `rollout.prompts_per_step` instructions
(Alpaca prompts from `data.path`, default the bundled instruction data), then, in one jitted
call with the frozen models as explicit arguments, scores them: the policy's log-probs and
values (`jaxgpt.rl.ppo.policy_and_values`), the frozen reference's log-probs, and the reward
model's score of prompt + completion (`jaxgpt.tasks.reward.reward_scores`, rows right-padded).
Rewards are the score at the last token minus `ppo.kl_coef` x the per-token log-ratio to the
reference; GAE gives advantages and value targets; `rollout.inner_epochs x rollout.minibatches`
updates with the clipped policy and value losses follow (`jaxgpt.rl.ppo`).

Evaluation on held-out instructions (`data.eval_size`, never trained on): `eval_reward` is
the reward model's mean score of greedy completions; `eval_kl` the mean summed log-ratio
policy / reference of sampled completions (a KL(policy || reference) estimate per
completion). metrics.json: `eval_reward_before`, `eval_reward_after`, `kl`, `eval_kl`, ...;
metrics.jsonl per logged iteration: score (reward-model mean), reward (score - KL penalty),
kl, clip_frac, value_loss, pg_loss, approx_kl, terminated (completions that emitted eos);
eval_samples.jsonl: the final greedy completions of the eval prompts with their scores.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import jax
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.engine import Plot
from jaxgpt.engine.driver import train
from jaxgpt.errors import UserError
from jaxgpt.config import at_least
from jaxgpt.rl.common import (RLTask, RolloutConfig, Timer, plain_params, prompt_indices, sampling_kwargs, token_kwargs,
                              validate_rollout_config)
from jaxgpt.rl.prompt_sets import load_prompts
from jaxgpt.rl.rollout import completion_texts, rollout
from jaxgpt.tasks import default_config
from jaxgpt.tasks.common import TaskConfig
from jaxgpt.tasks.reward import load_reward_model
from jaxgpt.io.files import atomic_write

DEFAULT_CONFIG = default_config("ppo")


@dataclass(frozen=True)
class PPODataConfig:
    """`data` section: the prompts (instruction records; responses are not used)."""

    path: str = "instruction-data"  # --data: bundled name | .json/.jsonl(.gz)/.parquet | tfds:NAME
    instruction_field: str = "instruction"
    input_field: str = "input"  # optional per record
    seed: int = 0  # the train / eval split and the prompt order
    eval_size: int = 100  # held-out prompts for evaluation
    max_prompt_tokens: int = 0  # longer prompts are dropped; 0 = keep all (P = the longest)


@dataclass(frozen=True)
class PPOSection:
    reward: str = ""  # --reward RUN: the reward model (a `finetune.py reward` run, HF folder or hub id); required
    kl_coef: float = 0.2  # per-token KL penalty to the reference in the reward
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True


@dataclass(frozen=True)
class PPOConfig(TaskConfig):
    data: PPODataConfig = field(default_factory=PPODataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOSection = field(default_factory=PPOSection)


def validate_ppo(p: PPOSection, d: PPODataConfig) -> None:
    at_least(p, "ppo", 0, "kl_coef", "value_clip", "vf_coef")
    if not p.clip_eps > 0:
        raise UserError(f"ppo.clip_eps must be > 0, got {p.clip_eps}")
    for name in ("gamma", "lam"):
        if not 0.0 <= getattr(p, name) <= 1.0:
            raise UserError(f"ppo.{name} must be in [0, 1], got {getattr(p, name)}")
    if not d.path.strip() or not d.instruction_field:
        raise UserError("data.path and data.instruction_field must be non-empty")
    at_least(d, "data", 1, "eval_size")
    at_least(d, "data", 0, "seed", "max_prompt_tokens")
    if not p.reward:  # last: the default config has none, and the value checks above name their key
        raise UserError("no reward model: pass --reward RUN (a `finetune.py reward` run, or a Hugging Face reward "
                        "model folder or hub id)")


def scorer(cfg: PPOConfig, policy_model, rm_cfg: ModelConfig, pad_id: int):
    """Jitted `score(params, ref_params, rm_params, tokens, attention_mask)` -> old log-probs,
    values, reference log-probs `[b, N]` and reward-model scores `[b]`: the frozen models are
    explicit arguments. `pad_id`: what fills the reward model's right-padded rows."""
    from jaxgpt.models import build_model
    from jaxgpt.rl.ppo import policy_and_values
    from jaxgpt.rl.rollout import completion_logprobs, right_padded
    from jaxgpt.tasks.reward import reward_scores

    n, temp = cfg.rollout.max_new_tokens, cfg.rollout.temperature
    ref_model = build_model(cfg.model)

    @jax.jit
    def score(params, ref_params, rm_params, tokens, attention_mask):
        logp, values = policy_and_values(policy_model, params, tokens, attention_mask, n, temp)
        ref = completion_logprobs(ref_model, ref_params, tokens, attention_mask, n, temperature=temp)
        rm_tokens, lengths = right_padded(tokens, attention_mask, pad_id=pad_id)
        return logp, values, ref, reward_scores(rm_cfg, rm_params, rm_tokens, lengths)

    return score


class PPO(RLTask):
    name = "ppo"
    config_class = PPOConfig
    plots = (Plot("reward.png", "iteration", ("score", "reward", "eval_reward"), "reward"),
             Plot("kl.png", "iteration", ("kl", "eval_kl"), "KL to reference (per completion)"),
             Plot("loss.png", "iteration", ("value_loss", "pg_loss", "clip_frac"), "loss"))

    @staticmethod
    def validate_config(cfg) -> None:
        validate_rollout_config(cfg.rollout)
        validate_ppo(cfg.ppo, cfg.data)

    def validate(self) -> None:
        super().validate()
        rm_cfg, rm_params = load_reward_model(self.cfg.ppo.reward)
        self.rm = (rm_cfg, self.dp.put_local(rm_params))  # frozen; placed once, not at every call
        policy = self.cfg.model
        if rm_cfg.vocab_size != policy.vocab_size:
            raise UserError(f"the reward model's vocabulary ({rm_cfg.vocab_size}) differs from the policy's "
                            f"({policy.vocab_size})")
        if rm_cfg.context_length < policy.context_length:
            raise UserError(f"the reward model's context ({rm_cfg.context_length}) is shorter than the policy's "
                            f"({policy.context_length}): it cannot score full rollouts")

    def load_data(self) -> None:
        self.data = load_prompts(self.cfg, self.tokenizer)

    def num_prompts(self) -> int:
        return len(self.data["train"][0])

    def model_attrs(self) -> dict:
        return {"value_head": True}

    def describe(self) -> str:
        d, r = self.data, self.cfg.rollout
        return (f"prompts: {self.num_prompts()} train / {len(d['eval'][0])} eval (dropped as too long: "
                f"{d['train'][2]} / {d['eval'][2]}) | reward model {self.cfg.ppo.reward} | "
                f"{r.prompts_per_step} prompts per iteration")

    def policy_loss_fn(self, model):
        from jaxgpt.rl.ppo import ppo_loss_fn

        p, r = self.cfg.ppo, self.cfg.rollout
        self.score = scorer(self.cfg, model, self.rm[0], self.tokenizer.pad_id)
        self.advantages_of = jax.jit(functools.partial(advantages, p))
        return ppo_loss_fn(model, clip_eps=p.clip_eps, value_clip=p.value_clip, vf_coef=p.vf_coef,
                           temperature=r.temperature)

    def experience(self, iteration: int, params) -> tuple[dict, dict]:
        r = self.cfg.rollout
        tokens, masks, _ = self.data["train"]
        idx = prompt_indices(iteration, r.prompts_per_step, len(tokens), self.cfg.data.seed)
        with Timer() as timer:
            out = rollout(plain_params(params, self.cfg), self.cfg.model, tokens[idx], masks[idx],
                          self.keys.rollout(iteration), max_new_tokens=r.max_new_tokens,
                          **token_kwargs(self.tokenizer, self.cfg.model), **sampling_kwargs(r))
            jax.block_until_ready(out["tokens"])
        logp, values, ref, scores = self.score(params, self.ref_params, self.rm[1], out["tokens"], out["attention_mask"])
        mask = out["completion_mask"].astype(np.float32)
        adv, returns, rewards = self.advantages_of(scores, logp, ref, values, mask)
        batch = jax.device_get({"tokens": out["tokens"], "attention_mask": out["attention_mask"],
                                "completion_mask": out["completion_mask"], "old_logprobs": logp * mask,
                                "old_values": values * mask, "advantages": adv, "returns": returns})
        lengths = np.asarray(out["lengths"])
        last = np.asarray(out["tokens"])[np.arange(len(lengths)), -r.max_new_tokens + np.maximum(lengths - 1, 0)]
        stats = {"score": float(np.mean(scores)), "reward": float(np.sum(rewards) / len(lengths)),
                 "kl": float(np.mean(np.sum(np.asarray((logp - ref) * mask), axis=1))),
                 "completion_len": float(lengths.mean()), "terminated": float(np.mean(np.isin(last, self.tokenizer.stop_ids))),
                 "rollout_tokens_per_sec": float(lengths.sum() / timer.seconds), "rollout_seconds": timer.seconds}
        return batch, stats

    def evaluate_params(self, params) -> dict:
        """The reward model's mean score of greedy completions of the held-out prompts, and
        the KL to the reference of sampled ones (summed log-ratio per completion)."""
        from jaxgpt.rl import common

        tokens, masks, _ = self.data["eval"]
        r = self.cfg.rollout
        batch = min(r.eval_batch_size, len(tokens))
        plain = plain_params(params, self.cfg)
        greedy = common.generate_all(plain, self.cfg.model, tokens, masks, self.keys.sample, batch=batch,
                                     max_new_tokens=r.max_new_tokens, temperature=0.0,
                                     **token_kwargs(self.tokenizer, self.cfg.model))
        sampled = common.generate_all(plain, self.cfg.model, tokens, masks, jax.random.fold_in(self.keys.sample, 1),
                                      batch=batch, max_new_tokens=r.max_new_tokens,
                                      **token_kwargs(self.tokenizer, self.cfg.model), **sampling_kwargs(r))
        score = lambda out: self.score(params, self.ref_params, self.rm[1], out["tokens"], out["attention_mask"])
        scores = np.concatenate([np.asarray(score(out)[3]) for out in greedy])
        kls = [np.sum(np.asarray(logp - ref) * out["completion_mask"], axis=1)
               for out, (logp, _, ref, _) in ((o, score(o)) for o in sampled)]
        self.eval_texts = [t for out in greedy for t in completion_texts(out, self.tokenizer.stop_ids, self.tokenizer)]
        self.eval_scores = scores.tolist()
        return {"eval_reward": float(np.mean(scores)), "eval_kl": float(np.mean(np.concatenate(kls))),
                "eval_completion_len": float(np.mean(np.concatenate([o["lengths"] for o in greedy])))}

    def summary(self, loop, before: dict, final: dict) -> dict:
        out = super().summary(loop, before, final)
        first, last = self.first_last("score")
        return {"reward_model": self.cfg.ppo.reward, **out, "eval_kl": final["eval_kl"],
                "kl": self.trained[-1]["kl"] if self.trained else None, "score_first": first, "score_last": last,
                "value_loss_last": self.trained[-1]["value_loss"] if self.trained else None,
                "num_prompts": {"train": self.num_prompts(), "eval": len(self.data["eval"][0])}}

    def done_line(self, s: dict) -> str:
        return (f"eval reward {s['eval_reward_before']:.4f} -> {s['eval_reward_after']:.4f} | "
                f"eval KL {s['eval_kl']:.3f}")

    def write_outputs(self, loop, summary: dict) -> None:
        atomic_write(self.run.path / "eval_samples.jsonl", "".join(
            json.dumps({"prompt": prompt, "completion": text, "score": s}) + "\n"
            for prompt, text, s in zip(self.data["eval_text"], self.eval_texts, self.eval_scores)))


def advantages(p: PPOSection, scores, logp, ref, values, mask):
    """`(advantages, returns, rewards)` `[b, n]`: KL-penalised rewards, GAE, whitening."""
    from jaxgpt.rl.ppo import gae, kl_penalized_rewards, whiten

    rewards = kl_penalized_rewards(scores, logp, ref, mask, p.kl_coef)
    adv, returns = gae(rewards, values, mask, gamma=p.gamma, lam=p.lam)
    return (whiten(adv, mask) if p.whiten_advantages else adv), returns, rewards


RECIPE = PPO


# The Python entry point: finetune_ppo(cfg, out_dir=None, *, resume=False, stop_after=None) -> metrics.json summary
finetune_ppo = functools.partial(train, PPO)
