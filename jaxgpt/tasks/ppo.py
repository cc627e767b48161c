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

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.lora import LoRAConfig
from jaxgpt.rl.common import RolloutConfig
from jaxgpt.tasks import common, default_config
from jaxgpt.tasks.common import FinetuneConfig, FinetuneTrainConfig

DEFAULT_CONFIG = default_config("ppo")


@dataclass(frozen=True)
class PPODataConfig:
    """`data` section: the prompts (instruction records; responses are not used)."""

    path: str = "instruction-data"  # --data: bundled name | .json/.jsonl(.gz) | tfds:NAME
    instruction_field: str = "instruction"
    input_field: str = "input"  # optional per record
    seed: int = 0  # the train / eval split and the prompt order
    eval_size: int = 100  # held-out prompts for evaluation
    max_prompt_tokens: int = 0  # longer prompts are dropped; 0 = keep all (P = the longest)


@dataclass(frozen=True)
class PPOSection:
    reward: str = ""  # --reward RUN: the reward model (a `finetune.py reward` run); required
    kl_coef: float = 0.2  # per-token KL penalty to the reference in the reward
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True


@dataclass(frozen=True)
class PPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PPODataConfig = field(default_factory=PPODataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


CONFIG_CLASS = PPOConfig


def validate_ppo(p: PPOSection, d: PPODataConfig) -> None:
    if not p.reward:
        raise UserError("no reward model: pass --reward RUN (a `finetune.py reward` run directory)")
    for name in ("kl_coef", "value_clip", "vf_coef"):
        if getattr(p, name) < 0:
            raise UserError(f"ppo.{name} must be >= 0, got {getattr(p, name)}")
    if not p.clip_eps > 0:
        raise UserError(f"ppo.clip_eps must be > 0, got {p.clip_eps}")
    for name in ("gamma", "lam"):
        if not 0.0 <= getattr(p, name) <= 1.0:
            raise UserError(f"ppo.{name} must be in [0, 1], got {getattr(p, name)}")
    if d.eval_size < 1:
        raise UserError(f"data.eval_size must be >= 1, got {d.eval_size}")


def load_prompts(cfg: PPOConfig) -> dict:
    """`{"train"|"eval": (tokens [n, P], mask [n, P])}` from the instruction records."""
    from jaxgpt.data.records import read_records
    from jaxgpt.prompts import format_prompt
    from jaxgpt.rl.common import prompt_arrays
    from jaxgpt.rl.rollout import encode_prompts

    d = cfg.data
    rows = read_records(d.path, {"instruction": d.instruction_field}, {"input": d.input_field})
    if len(rows) <= d.eval_size:
        raise UserError(f"{d.path} has {len(rows)} records, not more than data.eval_size={d.eval_size}")
    order = np.random.default_rng(d.seed).permutation(len(rows))
    out = {}
    for split, index in (("eval", order[: d.eval_size]), ("train", order[d.eval_size:])):
        ids = encode_prompts([format_prompt(rows[i]["instruction"], rows[i]["input"]) for i in index])
        tokens, mask, kept = prompt_arrays(ids, max_prompt_tokens=d.max_prompt_tokens,
                                           max_new_tokens=cfg.rollout.max_new_tokens,
                                           context_length=cfg.model.context_length, what=f"{d.path} {split}")
        out[split] = (tokens, mask, len(index) - len(kept))
        if split == "eval":  # "instruction [input]" of each kept prompt, for eval_samples.jsonl
            kept_rows = [rows[index[i]] for i in kept]
            out["eval_text"] = [r["instruction"] + (f" [{r['input']}]" if r["input"] else "") for r in kept_rows]
    return out


def scorer(cfg: PPOConfig, policy_model, rm_cfg: ModelConfig):
    """Jitted `score(params, ref_params, rm_params, tokens, attention_mask)` -> old log-probs,
    values, reference log-probs `[b, N]` and reward-model scores `[b]`: the frozen models are
    explicit arguments."""
    from jaxgpt.model import GPT
    from jaxgpt.rl.ppo import policy_and_values
    from jaxgpt.rl.rollout import completion_logprobs, right_padded
    from jaxgpt.tasks.reward import reward_scores
    from jaxgpt.tokenizer import EOT_ID

    n, temp = cfg.rollout.max_new_tokens, cfg.rollout.temperature
    ref_model = GPT(cfg.model)

    @jax.jit
    def score(params, ref_params, rm_params, tokens, attention_mask):
        logp, values = policy_and_values(policy_model, params, cfg.model, tokens, attention_mask, n, temp)
        ref = completion_logprobs(ref_model, ref_params, tokens, attention_mask, n, temperature=temp)
        rm_tokens, lengths = right_padded(tokens, attention_mask, pad_id=EOT_ID)
        return logp, values, ref, reward_scores(rm_cfg, rm_params, rm_tokens, lengths)

    return score


def make_experience_fn(cfg: PPOConfig, prompts: dict, policy, streams, rm):
    from jaxgpt.rl.common import Timer, plain_params, sampling_kwargs
    from jaxgpt.rl.loop import prompt_indices
    from jaxgpt.rl.ppo import gae, kl_penalized_rewards, whiten
    from jaxgpt.rl.rollout import rollout
    from jaxgpt.tokenizer import EOT_ID

    r, p = cfg.rollout, cfg.ppo
    rm_cfg, rm_params = rm
    score = scorer(cfg, policy.model, rm_cfg)
    tokens, masks, _ = prompts["train"]

    @jax.jit
    def advantages_of(scores, logp, ref, values, mask):
        rewards = kl_penalized_rewards(scores, logp, ref, mask, p.kl_coef)
        adv, returns = gae(rewards, values, mask, gamma=p.gamma, lam=p.lam)
        return (whiten(adv, mask) if p.whiten_advantages else adv), returns, rewards

    def make_experience(iteration: int, params):
        idx = prompt_indices(iteration, r.prompts_per_step, len(tokens), cfg.data.seed)
        with Timer() as timer:
            out = rollout(plain_params(params, cfg), cfg.model, tokens[idx], masks[idx], streams.rollout(iteration),
                          max_new_tokens=r.max_new_tokens, eos_id=EOT_ID, **sampling_kwargs(r))
            jax.block_until_ready(out["tokens"])
        logp, values, ref, scores = score(params, policy.ref_params, rm_params, out["tokens"], out["attention_mask"])
        mask = out["completion_mask"].astype(np.float32)
        adv, returns, rewards = advantages_of(scores, logp, ref, values, mask)
        batch = jax.device_get({"tokens": out["tokens"], "attention_mask": out["attention_mask"],
                                "completion_mask": out["completion_mask"], "old_logprobs": logp * mask,
                                "old_values": values * mask, "advantages": adv, "returns": returns})
        lengths = np.asarray(out["lengths"])
        last = np.asarray(out["tokens"])[np.arange(len(lengths)), -r.max_new_tokens + np.maximum(lengths - 1, 0)]
        stats = {"score": float(np.mean(scores)), "reward": float(np.sum(rewards) / len(lengths)),
                 "kl": float(np.mean(np.sum(np.asarray((logp - ref) * mask), axis=1))),
                 "completion_len": float(lengths.mean()), "terminated": float(np.mean(last == EOT_ID)),
                 "rollout_tokens_per_sec": float(lengths.sum() / timer.seconds)}
        return batch, stats

    return make_experience


def evaluate_fn(cfg: PPOConfig, prompts: dict, policy, keys, rm):
    """`evaluate(params) -> {eval_reward, eval_kl, eval_completion_len}` on held-out prompts."""
    from jaxgpt.rl.common import generate_all, plain_params, sampling_kwargs
    from jaxgpt.rl.rollout import completion_texts
    from jaxgpt.tokenizer import EOT_ID

    rm_cfg, rm_params = rm
    score = scorer(cfg, policy.model, rm_cfg)
    tokens, masks, _ = prompts["eval"]
    r = cfg.rollout
    batch = min(r.eval_batch_size, len(tokens))

    last = {"texts": [], "scores": []}

    def evaluate(params) -> dict:
        plain = plain_params(params, cfg)
        greedy = generate_all(plain, cfg.model, tokens, masks, keys.sample, batch=batch,
                              max_new_tokens=r.max_new_tokens, temperature=0.0, eos_id=EOT_ID)
        sampled = generate_all(plain, cfg.model, tokens, masks, jax.random.fold_in(keys.sample, 1), batch=batch,
                               max_new_tokens=r.max_new_tokens, eos_id=EOT_ID, **sampling_kwargs(r))
        scores, kls = [], []
        for out in greedy:
            scores.append(np.asarray(score(params, policy.ref_params, rm_params, out["tokens"], out["attention_mask"])[3]))
        for out in sampled:
            logp, _, ref, _ = score(params, policy.ref_params, rm_params, out["tokens"], out["attention_mask"])
            kls.append(np.sum(np.asarray(logp - ref) * out["completion_mask"], axis=1))
        last["texts"] = [t for out in greedy for t in completion_texts(out, EOT_ID)]
        last["scores"] = np.concatenate(scores).tolist()
        return {"eval_reward": float(np.mean(np.concatenate(scores))), "eval_kl": float(np.mean(np.concatenate(kls))),
                "eval_completion_len": float(np.mean(np.concatenate([o["lengths"] for o in greedy])))}

    return evaluate, last


def finetune_ppo(cfg: PPOConfig, out_dir: str | Path | None = None, *, resume: bool = False,
                 stop_after: int | None = None) -> dict:
    """PPO-train `cfg` into `out_dir`; returns the summary written to metrics.json."""
    from jaxgpt.metrics import plot_curves, read_jsonl, write_json
    from jaxgpt.optim import lr_schedule
    from jaxgpt.parallel import DataParallel, resolve_num_devices
    from jaxgpt.rl.common import build_policy, validate_rollout
    from jaxgpt.rl.loop import RLLoop, RLStreams
    from jaxgpt.rl.ppo import VALUE_HEAD, init_value_head, ppo_loss_fn
    from jaxgpt.tasks.reward import load_reward_model
    from jaxgpt.trainer import Keys, RunDir, default_out_dir, is_main_process, log

    started = time.perf_counter()
    run = RunDir(out_dir or default_out_dir("ppo"), resume=resume)
    cfg, loaded = common.resolve_init(cfg)
    t, r, p = cfg.train, cfg.rollout, cfg.ppo
    validate_ppo(p, cfg.data)
    dp = DataParallel(resolve_num_devices(t.num_devices))
    validate_rollout(r, r.prompts_per_step, dp.num_devices, t.grad_accum_steps)
    rm_cfg, rm_params = load_reward_model(p.reward)
    rm = (rm_cfg, jax.device_put(rm_params))  # frozen; on the device once, not at every call
    if rm[0].vocab_size != cfg.model.vocab_size:
        raise UserError(f"the reward model's vocabulary ({rm[0].vocab_size}) differs from the policy's "
                        f"({cfg.model.vocab_size})")
    if rm[0].context_length < cfg.model.context_length:
        cfg_ctx = cfg.model.context_length
        raise UserError(f"the reward model's context ({rm[0].context_length}) is shorter than the policy's "
                        f"({cfg_ctx}): it cannot score full rollouts")
    prompts = load_prompts(cfg)
    n_train = len(prompts["train"][0])
    total, eval_interval = common.schedule_steps(cfg, n_train // r.prompts_per_step)
    if total == 0:
        raise UserError(f"{n_train} training prompts, fewer than rollout.prompts_per_step={r.prompts_per_step}")
    updates = total * r.inner_epochs * r.minibatches
    keys = Keys.from_seed(t.seed)
    policy = build_policy(cfg, run, keys, resume=resume, total_updates=updates, loaded=loaded,
                          extra_params={VALUE_HEAD: init_value_head(cfg.model.n_embd)}, extra_trainable=(VALUE_HEAD,))
    if resume:
        log(f"resuming {run.path} from iteration {policy.iteration}")
    run.create(cfg)

    loss_fn = ppo_loss_fn(policy.model, cfg.model, clip_eps=p.clip_eps, value_clip=p.value_clip,
                          vf_coef=p.vf_coef, temperature=r.temperature)
    evaluate, last_eval = evaluate_fn(cfg, prompts, policy, keys, rm)
    meta = dict(policy.meta)
    if "eval_before" not in meta:
        meta["eval_before"] = evaluate(policy.state.params)
    loop = RLLoop(cfg=cfg, run=run, dp=dp, state=policy.state, tx=policy.tx, labels=policy.labels, loss_fn=loss_fn,
                  keys=keys, inner_epochs=r.inner_epochs, minibatches=r.minibatches, iteration=policy.iteration,
                  meta=meta)
    log(f"model: {policy.total:,} params, {policy.trainable:,} trainable ({cfg.finetune.train_mode}, value head "
        f"included) | prompts: {n_train} train / {len(prompts['eval'][0])} eval (dropped as too long: "
        f"{prompts['train'][2]} / {prompts['eval'][2]}) | reward model {p.reward} | {total} iterations x "
        f"{r.prompts_per_step} prompts | eval reward before: {meta['eval_before']['eval_reward']:.4f}")
    train_started = time.perf_counter()
    make_experience = make_experience_fn(cfg, prompts, policy, RLStreams.from_keys(keys), rm)
    loop.train(total, make_experience, evaluate, eval_interval, lr_at=lr_schedule(t, updates), stop_after=stop_after)
    train_seconds = time.perf_counter() - train_started

    records = read_jsonl(run.metrics_jsonl)
    final = loop.final_eval(evaluate)
    trained = [rec for rec in records if "score" in rec]
    before = meta["eval_before"]
    summary = {
        "iteration": loop.iteration, "step": loop.step, "init": cfg.finetune.init, "reward_model": p.reward,
        "train_mode": cfg.finetune.train_mode, "trainable_params": policy.trainable, "total_params": policy.total,
        "eval_reward_before": before["eval_reward"], "eval_reward_after": final["eval_reward"],
        "eval_kl_before": before["eval_kl"], "eval_kl": final["eval_kl"],
        "kl": trained[-1]["kl"] if trained else None,
        "score_first": trained[0]["score"] if trained else None, "score_last": trained[-1]["score"] if trained else None,
        "value_loss_last": trained[-1]["value_loss"] if trained else None,
        "rollout_tokens_per_sec": float(np.median([rec["rollout_tokens_per_sec"] for rec in trained])) if trained else None,
        "seconds_per_iteration": loop.seconds_per_iteration(), "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "num_prompts": {"train": n_train, "eval": len(prompts["eval"][0])},
    }
    if is_main_process():
        write_json(run.path / "metrics.json", summary)
        with (run.path / "eval_samples.jsonl").open("w") as f:
            for prompt, text, s in zip(prompts["eval_text"], last_eval["texts"], last_eval["scores"]):
                f.write(json.dumps({"prompt": prompt, "completion": text, "score": s}) + "\n")
        plot_curves(run.path / "reward.png", records, "iteration", ["score", "reward", "eval_reward"], "reward")
        plot_curves(run.path / "kl.png", records, "iteration", ["kl", "eval_kl"], "KL to reference (per completion)")
        plot_curves(run.path / "loss.png", records, "iteration", ["value_loss", "pg_loss", "clip_frac"], "loss")
        log(f"done: iteration {loop.iteration} | eval reward {summary['eval_reward_before']:.4f} -> "
            f"{summary['eval_reward_after']:.4f} | eval KL {summary['eval_kl']:.3f} | "
            f"{summary['wall_seconds'] / 60:.1f} min | run: {run.path}")
    return summary


# ---------------------------------------------------------------------------------------
# Command line (`finetune.py ppo`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", dest="rl_reward", metavar="RUN",
                        help="the reward model: a `finetune.py reward` run directory (sets ppo.reward)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if getattr(args, "rl_reward", None):
        if args.resume:
            parser.error("--resume takes its reward model from the run; use only --set with it")
        args.overrides = list(args.overrides) + [f"ppo.reward={json.dumps(args.rl_reward)}"]
    cfg, out, resume = common.load_task_config(args, PPOConfig, DEFAULT_CONFIG, parser)
    finetune_ppo(cfg, out, resume=resume)
    return 0
