"""One GRPO iteration's experience: rollouts, verifier rewards, overlong shaping, dynamic
sampling, advantages. `sample_groups(recipe, iteration, params)` is what
`jaxgpt.tasks.grpo.GRPO.experience` calls before it adds old and reference log-probs.

    try 0      the iteration's `prompts_per_step` prompts (`prompt_indices`), G samples each,
               with the iteration's rollout key: exactly the rollout plain GRPO makes
    rewards    the task's verifier (outcome, or per-line process rewards), then DAPO's soft
               overlong penalty on the outcome when `overlong=penalty`
    tries 1..  with `dynamic_sampling`: groups whose rewards are all equal are dropped and new
               prompts are rolled out (`jaxgpt.rl.dynamic_sampling`) until the batch is full or
               `max_sampling_tries` rollouts were made
    batch      `prompts_per_step x G` rows (one shape for the train step); advantages from the
               shaped rewards with the variant's reward scaling; with `overlong=mask` the
               completion mask of truncated completions (no end token within the budget) is
               zeroed, so they leave the loss

Metrics (per iteration; the loop averages them per record): `reward`, `format_rate`,
`completion_len`, `groups_all_correct`, `groups_all_wrong`, `truncated_frac` of try 0 (the
policy's own statistics on the scheduled prompts, comparable across variants), and
`groups_dropped` (zero-signal groups seen over all tries), `groups_unfilled` (zero-signal
groups kept because the tries ran out), `sampling_tries`, `overlong_penalty` (mean shaping),
`rollout_tokens_per_sec`, `rollout_seconds` (all tries).
"""
from __future__ import annotations

import jax
import numpy as np

from jaxgpt.rl.common import Timer, prompt_indices, sampling_kwargs, token_kwargs
from jaxgpt.rl.dynamic_sampling import choose_groups, gather_groups, informative_groups, refill_prompts
from jaxgpt.rl.grpo import group_advantages, overlong_penalty, process_advantages
from jaxgpt.rl.rollout import completion_texts, rollout


def _one_try(recipe, params, idx, key) -> tuple[dict, float]:
    """Roll out and score prompts `idx`: a dict of `[rows, ...]` arrays (the rollout's, plus
    rewards, shaped `signal`, problems, ...) and the seconds the rollout took."""
    cfg, data, s, tok = recipe.cfg, recipe.data, recipe.settings, recipe.tokenizer
    r, g, n = cfg.rollout, cfg.grpo, cfg.rollout.max_new_tokens
    problems = data.problems["rl"]
    with Timer() as timer:
        out = jax.device_get(rollout(params, cfg.model, data.tokens["rl"][idx], data.masks["rl"][idx], key,
                                     group_size=g.group_size, max_new_tokens=n, **token_kwargs(tok, cfg.model),
                                     **sampling_kwargs(r)))
    out = {k: np.asarray(v) for k, v in out.items()}
    texts = completion_texts(out, tok.stop_ids, tok)
    rows = [problems[i] for i in np.repeat(idx, g.group_size)]
    out["rewards"] = np.array([data.task.reward(t, p) for t, p in zip(texts, rows)], np.float32)
    out["answered"] = np.array([data.task.extract(t) is not None for t in texts], np.float32)
    out["truncated"] = ((out["lengths"] == n) & ~np.isin(out["tokens"][:, -1], tok.stop_ids)).astype(np.float32)
    shaping = (overlong_penalty(out["lengths"], n, s.overlong_buffer, s.overlong_penalty)
               if s.overlong == "penalty" else np.zeros(len(texts), np.float32))
    out["shaping"] = shaping
    if recipe.process:
        steps = np.array([data.task.step_rewards(t, p) for t, p in zip(texts, rows)], np.float32)
        steps[:, -1] += shaping  # the penalty lands on the outcome, the last step
        out["signal"] = steps
    else:
        out["signal"] = out["rewards"] + shaping
    return out, timer.seconds


def sample_groups(recipe, iteration: int, params) -> tuple[dict, dict, dict]:
    """`(batch, out, stats)`: the train batch without log-probs (tokens, attention_mask,
    completion_mask, advantages), the chosen rows' rollout arrays, and the iteration's stats.
    params: plain GPT params (LoRA merged) that sample."""
    cfg, s = recipe.cfg, recipe.settings
    r, g = cfg.rollout, cfg.grpo
    num = len(recipe.data.problems["rl"])
    idx = prompt_indices(iteration, r.prompts_per_step, num, cfg.data.seed)
    key = recipe.keys.rollout(iteration)
    parts, flags, seconds, seen = [], [], 0.0, [idx]
    for attempt in range(s.max_sampling_tries if s.dynamic_sampling else 1):
        if attempt:
            idx = refill_prompts(num, r.prompts_per_step, seed=cfg.data.seed, iteration=iteration, attempt=attempt,
                                 exclude=np.concatenate(seen))
            seen.append(idx)
        part, secs = _one_try(recipe, params, idx, key if attempt == 0 else jax.random.fold_in(key, attempt))
        parts.append(part)
        seconds += secs
        flags.append(informative_groups(part["signal"], g.group_size))
        if not s.dynamic_sampling or sum(f.sum() for f in flags) >= r.prompts_per_step:
            break
    if s.dynamic_sampling:
        chosen, unfilled = choose_groups(flags, r.prompts_per_step)
        out = gather_groups(parts, chosen, g.group_size)
    else:
        out, unfilled = parts[0], 0
    advantages = _advantages(recipe, out)
    mask = out["completion_mask"]
    if s.overlong == "mask":
        mask = mask & (out["truncated"] == 0)[:, None]
    batch = {"tokens": out["tokens"], "attention_mask": out["attention_mask"], "completion_mask": mask,
             "advantages": advantages}
    first = parts[0]
    groups = first["rewards"].reshape(-1, g.group_size)
    stats = {"reward": float(first["rewards"].mean()), "format_rate": float(first["answered"].mean()),
             "completion_len": float(first["lengths"].mean()),
             "groups_all_correct": float(np.mean(groups.min(1) == 1.0)),
             "groups_all_wrong": float(np.mean(groups.max(1) == 0.0)),
             "truncated_frac": float(first["truncated"].mean()),
             "rollout_tokens_per_sec": float(sum(p["lengths"].sum() for p in parts) / seconds),
             "rollout_seconds": seconds}
    if s.dynamic_sampling:
        stats.update(groups_dropped=float(sum((~f).sum() for f in flags)), groups_unfilled=float(unfilled),
                     sampling_tries=float(len(parts)))
    if s.overlong == "penalty":
        stats["overlong_penalty"] = float(first["shaping"].mean())
    return batch, out, stats


def _advantages(recipe, out: dict) -> np.ndarray:
    """`[rows]` (outcome) or `[rows, n]` (process) advantages of the chosen rows."""
    g, s, n = recipe.cfg.grpo, recipe.settings, recipe.cfg.rollout.max_new_tokens
    if recipe.process:
        newlines = recipe.newlines[out["tokens"][:, -n:]]
        segments = np.cumsum(newlines, axis=1) - newlines  # the line each token starts on
        return np.asarray(process_advantages(out["signal"], segments, g.group_size, scale=s.scale_rewards))
    return np.asarray(group_advantages(out["signal"], g.group_size, scale=s.scale_rewards))


__all__ = ["sample_groups"]
