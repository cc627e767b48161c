"""`finetune.py grpo`: GRPO with verifiable rewards (`jaxgpt.rl.tasks`: arithmetic, gsm8k).

Each iteration takes `rollout.prompts_per_step` problems of the task's RL split, samples
`grpo.group_size` completions of each (one jitted call, `jaxgpt.rl.rollout`), rewards each
completion 1/0 by the task's strict verifier, turns rewards into group-normalised
advantages, scores the completions under the frozen reference model, and makes
`rollout.inner_epochs x rollout.minibatches` updates with the clipped GRPO loss
(`jaxgpt.rl.grpo`) through the shared, pmapped train step. Prompts are the Alpaca format
(`jaxgpt.prompts.format_prompt`, instruction = the question), as in `finetune.py instruct
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
from jaxgpt.rl.grpo import LOSS_AGGREGATIONS
from jaxgpt.tasks import common, default_config
from jaxgpt.tasks.common import FinetuneConfig, FinetuneTrainConfig

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
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


CONFIG_CLASS = GRPOConfig


def validate_grpo(g: GRPOSection) -> None:
    if g.group_size < 2:
        raise UserError(f"grpo.group_size must be >= 2 (advantages compare completions of a prompt), got {g.group_size}")
    if not g.clip_eps > 0 or g.clip_eps_high < 0:
        raise UserError(f"grpo.clip_eps must be > 0 and grpo.clip_eps_high >= 0, got {g.clip_eps}, {g.clip_eps_high}")
    if g.kl_beta < 0:
        raise UserError(f"grpo.kl_beta must be >= 0, got {g.kl_beta}")
    if g.supervision not in SUPERVISION:
        raise UserError(f"grpo.supervision must be one of {', '.join(SUPERVISION)}, got {g.supervision!r}")
    if g.loss_agg not in LOSS_AGGREGATIONS:
        raise UserError(f"grpo.loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {g.loss_agg!r}")


@dataclass
class TaskData:
    """Problems and their padded prompts: `rl` (training) and `eval` (held out)."""

    task: object
    problems: dict
    tokens: dict
    masks: dict
    dropped: dict


def load_task_data(cfg: GRPOConfig) -> TaskData:
    from jaxgpt.prompts import format_prompt
    from jaxgpt.rl.common import prompt_arrays
    from jaxgpt.rl.rollout import encode_prompts
    from jaxgpt.rl.tasks import get_task

    d = cfg.data
    if d.eval_size < 0:
        raise UserError(f"data.eval_size must be >= 0, got {d.eval_size}")
    task = get_task(d.task, d.path)
    problems, tokens, masks, dropped = {}, {}, {}, {}
    for split in ("rl", "eval"):
        probs = task.split(split, d.seed)
        if split == "eval" and d.eval_size:
            probs = probs[: d.eval_size]
        if not probs:
            raise UserError(f"task {d.task}: the {split} split is empty; give more data")
        ids = encode_prompts([format_prompt(p.question) for p in probs])
        tokens[split], masks[split], kept = prompt_arrays(
            ids, max_prompt_tokens=d.max_prompt_tokens, max_new_tokens=cfg.rollout.max_new_tokens,
            context_length=cfg.model.context_length, what=f"{d.task} {split}")
        problems[split] = [probs[i] for i in kept]
        dropped[split] = len(probs) - len(kept)
    warn_if_solutions_cut(problems["rl"], cfg.rollout.max_new_tokens)
    return TaskData(task, problems, tokens, masks, dropped)


def warn_if_solutions_cut(problems, max_new_tokens: int) -> None:
    """A completion cut at `max_new_tokens` has no final answer and scores 0, so a budget
    shorter than the task's worked solutions silently zeroes every reward: say so."""
    from jaxgpt.tokenizer import encode_batch
    from jaxgpt.trainer import log

    needed = np.array([len(ids) + 1 for ids in encode_batch([p.solution for p in problems])])  # + <|endoftext|>
    cut = float(np.mean(needed > max_new_tokens))
    if cut > 0:
        log(f"warning: {cut:.0%} of the RL split's reference solutions need more than rollout.max_new_tokens="
            f"{max_new_tokens} tokens (longest {needed.max()}, with <|endoftext|>); completions cut there have no "
            "final answer and score 0: raise rollout.max_new_tokens")


def make_experience_fn(cfg: GRPOConfig, data: TaskData, policy, streams):
    """`make_experience(iteration, params) -> (batch, stats)` for `RLLoop`."""
    from jaxgpt.rl.common import Timer, plain_params, sampling_kwargs
    from jaxgpt.rl.grpo import group_advantages, process_advantages
    from jaxgpt.rl.loop import prompt_indices
    from jaxgpt.rl.rollout import completion_logprobs, completion_texts, rollout
    from jaxgpt.tokenizer import EOT_ID

    r, g = cfg.rollout, cfg.grpo
    from jaxgpt.model import GPT

    ref_model = GPT(cfg.model)
    n, temp = r.max_new_tokens, r.temperature
    ref_logprobs = jax.jit(lambda ref, tokens, mask: completion_logprobs(ref_model, ref, tokens, mask, n,
                                                                         temperature=temp))
    # The sampler's log-probs are untempered: at T != 1 the tempered policy rescores its samples.
    policy_logprobs = jax.jit(lambda p, tokens, mask: completion_logprobs(policy.model, p, tokens, mask, n,
                                                                          temperature=temp))
    sample_params = lambda p: plain_params(p, cfg)
    problems = data.problems["rl"]
    process = g.supervision == "process" or (g.supervision == "auto" and hasattr(data.task, "step_rewards"))
    newline_table = token_newlines() if process else None
    on_policy = is_on_policy(r)

    def make_experience(iteration: int, params):
        idx = prompt_indices(iteration, r.prompts_per_step, len(problems), cfg.data.seed)
        with Timer() as timer:
            out = rollout(sample_params(params), cfg.model, data.tokens["rl"][idx], data.masks["rl"][idx],
                          streams.rollout(iteration), group_size=g.group_size, max_new_tokens=n,
                          eos_id=EOT_ID, **sampling_kwargs(r))
            out = jax.device_get(out)
        texts = completion_texts(out, EOT_ID)
        rows = [problems[i] for i in np.repeat(idx, g.group_size)]
        rewards = np.array([data.task.reward(t, p) for t, p in zip(texts, rows)], np.float32)
        answered = np.array([data.task.extract(t) is not None for t in texts], np.float32)
        if process:
            steps = np.array([data.task.step_rewards(t, p) for t, p in zip(texts, rows)], np.float32)
            comp = out["tokens"][:, -n:]
            newlines = newline_table[comp]
            segments = np.cumsum(newlines, axis=1) - newlines  # the line each token starts on
            advantages = np.asarray(process_advantages(steps, segments, g.group_size))
        else:
            advantages = np.asarray(group_advantages(rewards, g.group_size, normalize_std=g.normalize_std))
        mask = out["completion_mask"].astype(np.float32)
        # The reference is scored when the loss needs it, else only on logged iterations (kl_ref);
        # the tempered policy is rescored for the loss's old log-probs unless on-policy, and for kl_ref.
        logged = (iteration + 1) % cfg.train.log_interval == 0
        score_ref = g.kl_beta > 0 or logged
        if temp != 1.0 and (logged or not on_policy):
            out["logprobs"] = np.asarray(policy_logprobs(params, out["tokens"], out["attention_mask"])) * mask
        ref = (np.asarray(ref_logprobs(policy.ref_params, out["tokens"], out["attention_mask"])) * mask
               if score_ref else out["logprobs"])
        batch = {"tokens": out["tokens"], "attention_mask": out["attention_mask"],
                 "completion_mask": out["completion_mask"], "old_logprobs": out["logprobs"],
                 "ref_logprobs": ref, "advantages": advantages}
        groups = rewards.reshape(-1, g.group_size)
        stats = {
            "reward": float(rewards.mean()),
            "format_rate": float(answered.mean()),
            "completion_len": float(out["lengths"].mean()),
            "groups_all_correct": float(np.mean(groups.min(1) == 1.0)),
            "groups_all_wrong": float(np.mean(groups.max(1) == 0.0)),
            "rollout_tokens_per_sec": float(out["lengths"].sum() / timer.seconds),
        }
        if logged:  # the sequence-level KL(policy || reference) estimate, sum_t (logp - ref)
            stats["kl_ref"] = float(np.mean(np.sum((out["logprobs"] - ref) * mask, axis=1)))
        return batch, stats

    return make_experience


def is_on_policy(r) -> bool:
    """One update per batch of rollouts, made with the params that sampled it."""
    return r.inner_epochs * r.minibatches == 1


def token_newlines():
    """`[vocab]` int32: how many newlines each GPT-2 token decodes to (process supervision
    splits completions into solution lines by these)."""
    from jaxgpt.tokenizer import N_VOCAB, decode

    return np.array([decode([i]).count("\n") for i in range(N_VOCAB)], np.int32)


def evaluate_fn(cfg: GRPOConfig, data: TaskData, keys):
    """`evaluate(params) -> {eval_accuracy, eval_format_rate, eval_completion_len}` (greedy),
    and the last call's completions (for eval_samples.jsonl)."""
    from jaxgpt.rl.common import generate_all, plain_params
    from jaxgpt.rl.rollout import completion_texts
    from jaxgpt.tokenizer import EOT_ID

    last = {"texts": []}
    sample_params = lambda p: plain_params(p, cfg)

    def evaluate(params) -> dict:
        outs = generate_all(sample_params(params), cfg.model, data.tokens["eval"], data.masks["eval"], keys.sample,
                            batch=min(cfg.rollout.eval_batch_size, len(data.tokens["eval"])),
                            max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0, eos_id=EOT_ID)
        texts = [t for out in outs for t in completion_texts(out, EOT_ID)]
        probs = data.problems["eval"]
        rewards = [data.task.reward(t, p) for t, p in zip(texts, probs)]
        last["texts"] = texts
        metrics = {"eval_accuracy": float(np.mean(rewards)),
                   "eval_format_rate": float(np.mean([data.task.extract(t) is not None for t in texts])),
                   "eval_completion_len": float(np.mean(np.concatenate([out["lengths"] for out in outs])))}
        if hasattr(data.task, "step_rewards"):  # which worked line goes wrong: [line 1, line 2, ..., answer]
            steps = np.array([data.task.step_rewards(t, p) for t, p in zip(texts, probs)], np.float64)
            metrics["eval_step_accuracy"] = [round(float(v), 4) for v in steps.mean(0)]
        return metrics

    return evaluate, last


def finetune_grpo(cfg: GRPOConfig, out_dir: str | Path | None = None, *, resume: bool = False,
                  stop_after: int | None = None) -> dict:
    """GRPO-train `cfg` into `out_dir`; returns the summary written to metrics.json.

    stop_after: stop after this many iterations as if interrupted (`--resume` continues)."""
    from jaxgpt.metrics import plot_curves, read_jsonl, write_json
    from jaxgpt.optim import lr_schedule
    from jaxgpt.parallel import DataParallel, resolve_num_devices
    from jaxgpt.rl.common import build_policy, validate_rollout
    from jaxgpt.rl.grpo import grpo_loss_fn
    from jaxgpt.rl.loop import RLLoop, RLStreams
    from jaxgpt.trainer import Keys, RunDir, default_out_dir, is_main_process, log

    started = time.perf_counter()
    run = RunDir(out_dir or default_out_dir("grpo"), resume=resume)
    cfg, loaded = common.resolve_init(cfg)  # also on resume: the reference model
    t, r, g = cfg.train, cfg.rollout, cfg.grpo
    validate_grpo(g)
    dp = DataParallel(resolve_num_devices(t.num_devices))
    validate_rollout(r, r.prompts_per_step * g.group_size, dp.num_devices, t.grad_accum_steps)
    from jaxgpt.rl.tasks import get_task

    if g.supervision == "process" and not hasattr(get_task(cfg.data.task, cfg.data.path), "step_rewards"):
        raise UserError(f"task {cfg.data.task} has no process rewards; set grpo.supervision=outcome (or auto)")
    data = load_task_data(cfg)
    total, eval_interval = common.schedule_steps(cfg, len(data.problems["rl"]) // r.prompts_per_step)
    if total == 0:
        raise UserError(f"the RL split has {len(data.problems['rl'])} prompts, fewer than "
                        f"rollout.prompts_per_step={r.prompts_per_step}; lower it")
    updates = total * r.inner_epochs * r.minibatches
    keys = Keys.from_seed(t.seed)
    policy = build_policy(cfg, run, keys, resume=resume, total_updates=updates, loaded=loaded)
    if resume:
        log(f"resuming {run.path} from iteration {policy.iteration}")
    run.create(cfg)

    loss_fn = grpo_loss_fn(policy.model, clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high or None,
                           kl_beta=g.kl_beta, loss_agg=g.loss_agg, temperature=r.temperature,
                           on_policy=is_on_policy(r))
    evaluate, last_eval = evaluate_fn(cfg, data, keys)
    meta = dict(policy.meta)
    if "eval_before" not in meta:
        meta["eval_before"] = evaluate(policy.state.params)
    loop = RLLoop(cfg=cfg, run=run, dp=dp, state=policy.state, tx=policy.tx, labels=policy.labels, loss_fn=loss_fn,
                  keys=keys, inner_epochs=r.inner_epochs, minibatches=r.minibatches, iteration=policy.iteration,
                  meta=meta)
    log(f"model: {policy.total:,} params, {policy.trainable:,} trainable ({cfg.finetune.train_mode}) | task "
        f"{cfg.data.task}: {len(data.problems['rl'])} RL / {len(data.problems['eval'])} eval prompts "
        f"(dropped as too long: {data.dropped['rl']} / {data.dropped['eval']}) | {total} iterations x "
        f"{r.prompts_per_step} prompts x {g.group_size} samples | devices: {dp.num_devices} | eval accuracy "
        f"before: {meta['eval_before']['eval_accuracy']:.4f}")
    train_started = time.perf_counter()
    streams = RLStreams.from_keys(keys)
    make_experience = make_experience_fn(cfg, data, policy, streams)
    loop.train(total, make_experience, evaluate, eval_interval, lr_at=lr_schedule(t, updates), stop_after=stop_after)
    train_seconds = time.perf_counter() - train_started

    records = read_jsonl(run.metrics_jsonl)
    final = loop.final_eval(evaluate)
    before = meta["eval_before"]
    trained = [rec for rec in records if "reward" in rec]
    summary = {
        "iteration": loop.iteration,
        "step": loop.step,
        "task": cfg.data.task,
        "init": cfg.finetune.init,
        "train_mode": cfg.finetune.train_mode,
        "trainable_params": policy.trainable,
        "total_params": policy.total,
        "eval_accuracy_before": before["eval_accuracy"],
        "eval_accuracy_after": final["eval_accuracy"],
        "eval_format_rate_before": before["eval_format_rate"],
        "eval_format_rate_after": final["eval_format_rate"],
        "eval_completion_len_after": final["eval_completion_len"],
        "eval_step_accuracy_before": before.get("eval_step_accuracy"),
        "eval_step_accuracy_after": final.get("eval_step_accuracy"),
        "reward_first": trained[0]["reward"] if trained else None,
        "reward_last": trained[-1]["reward"] if trained else None,
        "kl": next((rec["kl_ref"] for rec in reversed(trained) if "kl_ref" in rec), None),
        "rollout_tokens_per_sec": float(np.median([rec["rollout_tokens_per_sec"] for rec in trained])) if trained else None,
        "seconds_per_iteration": loop.seconds_per_iteration(),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "num_prompts": {"rl": len(data.problems["rl"]), "eval": len(data.problems["eval"])},
    }
    if is_main_process():
        write_json(run.path / "metrics.json", summary)
        with (run.path / "eval_samples.jsonl").open("w") as f:
            for p, text in zip(data.problems["eval"], last_eval["texts"]):
                f.write(json.dumps({"question": p.question, "answer": p.answer, "completion": text,
                                    "reward": data.task.reward(text, p)}) + "\n")
        plot_curves(run.path / "reward.png", records, "iteration", ["reward", "eval_accuracy"], "reward / accuracy")
        plot_curves(run.path / "kl.png", records, "iteration", ["kl_ref", "clip_frac"], "KL to reference / clip fraction")
        log(f"done: iteration {loop.iteration} | eval accuracy {summary['eval_accuracy_before']:.4f} -> "
            f"{summary['eval_accuracy_after']:.4f} | {summary['wall_seconds'] / 60:.1f} min | run: {run.path}")
    return summary


# ---------------------------------------------------------------------------------------
# Command line (`finetune.py grpo`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # dest is not "task": finetune.py's subcommand is stored there.
    parser.add_argument("--task", dest="rl_task", metavar="TASK",
                        help="verifiable task: arithmetic[:digits=1,operands=3,ops=+-,style=chain] (the defaults) "
                             "| gsm8k (sets data.task)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if getattr(args, "rl_task", None):
        if args.resume:
            parser.error("--resume takes its task from the run; use only --set with it")
        args.overrides = list(args.overrides) + [f"data.task={json.dumps(args.rl_task)}"]
    cfg, out, resume = common.load_task_config(args, GRPOConfig, DEFAULT_CONFIG, parser)
    finetune_grpo(cfg, out, resume=resume)
    return 0
