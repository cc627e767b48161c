"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages and the clipped loss.

For each prompt, G completions are sampled and scored by a verifier; completion i of a
group gets the advantage

    A_i = (r_i - mean(r)) / (std(r) + eps)      (std: the sample std of the group, ddof 1;
                                                 `normalize_std=False` keeps r_i - mean(r))

for every one of its tokens. With ratio_t = pi_theta(o_t | ...) / pi_old(o_t | ...), the
per-token loss is the negative clipped surrogate plus an optional KL penalty to the frozen
reference model (the k3 estimator, unbiased and always >= 0):

    l_t = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

aggregated either per sequence (the paper: mean over each completion's tokens, then mean
over completions) or per token (DAPO: mean over all completion tokens of the batch, so long
completions weigh more). Every function here is pure; `grpo_loss_fn` adapts them to the
shared `jaxgpt.train.steps.train_step` as `(loss_sum, {"count": ..., other sums})`, so gradient
accumulation and device psums give the exact batch mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_AGGREGATIONS = ("sequence", "token")


def group_advantages(rewards, group_size: int, *, normalize_std: bool = True, eps: float = 1e-4):
    """Group-normalised advantages `[rows]` for rewards `[rows]` (rows = prompts x G, the G
    completions of a prompt adjacent). A group with one distinct reward gets 0."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if normalize_std:
        std = jnp.std(r, axis=1, keepdims=True, ddof=1) if group_size > 1 else jnp.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def process_advantages(step_rewards, segments, group_size: int, *, eps: float = 1e-4):
    """Per-token advantages `[rows, n]` from per-step rewards (GRPO with process supervision,
    DeepSeekMath sec. 4.1.3): every step reward of a group is normalised by the mean and
    std (ddof 1) of *all* step rewards of the group, and a token's advantage is the sum of
    the normalised rewards of its own step and every later step of its completion.

    step_rewards: `[rows, S]` (rows = prompts x G, groups adjacent); segments: `[rows, n]`
    int, the step index of each completion token (values >= S count as the last step)."""
    r = jnp.asarray(step_rewards, jnp.float32)
    rows, steps = r.shape
    g = r.reshape(-1, group_size * steps)
    std = jnp.std(g, axis=1, keepdims=True, ddof=1) if g.shape[1] > 1 else jnp.zeros_like(g[:, :1])
    norm = ((g - jnp.mean(g, axis=1, keepdims=True)) / (std + eps)).reshape(rows, steps)
    to_go = jnp.flip(jnp.cumsum(jnp.flip(norm, axis=1), axis=1), axis=1)  # sum over steps >= j
    index = jnp.clip(jnp.asarray(segments, jnp.int32), 0, steps - 1)
    return jnp.take_along_axis(to_go, index, axis=1)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi_theta || pi_ref) from sampled tokens' log-probs
    (Schulman 2020): exp(ref - logp) - (ref - logp) - 1, elementwise, >= 0."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def clipped_surrogate(logp, old_logp, advantages, clip_low: float, clip_high: float):
    """`(loss [..], clipped [..])`: -min(ratio A, clip(ratio, 1-low, 1+high) A) per token, and
    1.0 where the clipped branch was taken (its gradient is zero there)."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -jnp.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).astype(jnp.float32)


def aggregate(per_token, mask, mode: str):
    """`(sum, count)` of `per_token [b, n]` over `mask [b, n]`: per token (sum over tokens,
    count = tokens) or per sequence (sum over rows of each row's token mean, count = rows
    with at least one token). sum / count is the loss; sums add across micro-batches."""
    mask = mask.astype(jnp.float32)
    if mode == "token":
        return jnp.sum(per_token * mask), jnp.sum(mask)
    if mode == "sequence":
        tokens = jnp.sum(mask, axis=1)
        per_row = jnp.sum(per_token * mask, axis=1) / jnp.maximum(tokens, 1.0)
        return jnp.sum(per_row), jnp.sum((tokens > 0).astype(jnp.float32))
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, kl_beta: float = 0.0, loss_agg: str = "sequence"):
    """GRPO loss over a batch of completions: `(loss_sum, sums)`.

    logp, old_logp, ref_logp, mask: `[b, n]` (policy now, policy at sampling time, frozen
    reference; mask 1 on completion tokens); advantages: `[b]` (one per completion) or
    `[b, n]` (per token: process supervision). sums: `count` (the
    denominator, see `aggregate`), `clip_frac`, `kl` (k3), `ratio`, `pg_loss`, each aggregated
    like the loss, so sums / count are their means."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages if advantages.ndim == 2 else advantages[:, None]  # per token or per sequence
    pg, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps, high)
    kl = k3_kl(logp, ref_logp)
    per_token = pg + kl_beta * kl if kl_beta else pg
    loss_sum, count = aggregate(per_token, mask, loss_agg)
    sums = {"count": count}
    for name, value in (("pg_loss", pg), ("clip_frac", clipped), ("kl", kl), ("ratio", jnp.exp(logp - old_logp))):
        sums[name] = jax.lax.stop_gradient(aggregate(value, mask, loss_agg)[0])
    return loss_sum, sums


def grpo_loss_fn(model, *, clip_eps: float, clip_eps_high: float | None, kl_beta: float, loss_agg: str,
                 temperature: float = 1.0, on_policy: bool = False):
    """`loss_fn(params, batch, dropout_key)` for `jaxgpt.train.steps.train_step`.

    batch: `tokens`, `attention_mask` `[b, P + N]`; `completion_mask`, `old_logprobs`,
    `ref_logprobs` `[b, N]`; `advantages [b]`. Dropout stays off whatever the key: the
    importance ratio must compare the policy with itself, not with a dropped-out copy.
    temperature: the sampling temperature; log-probs are of the tempered policy, so
    `old_logprobs` and `ref_logprobs` must be too.
    on_policy: each batch gets one update, made with the params that sampled it
    (inner_epochs = minibatches = 1): the old log-probs are then the current ones with the
    gradient stopped (ratio exactly 1, the plain policy gradient) and `old_logprobs` is
    ignored, which spares the caller a forward pass to rescore every batch.
    With kl_beta 0 the `kl` sum is left out of the metrics: callers then score the reference
    only on logged iterations (GRPO's `kl_ref`), so `ref_logprobs` is a stand-in on the others."""
    from jaxgpt.rl.rollout import completion_logprobs

    def loss_fn(params, batch, dropout_key):
        del dropout_key
        n = batch["completion_mask"].shape[1]
        logp = completion_logprobs(model, params, batch["tokens"], batch["attention_mask"], n,
                                   temperature=temperature)
        old_logp = jax.lax.stop_gradient(logp) if on_policy else batch["old_logprobs"]
        loss_sum, sums = grpo_loss(logp, old_logp, batch["ref_logprobs"], batch["advantages"],
                                   batch["completion_mask"], clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                   kl_beta=kl_beta, loss_agg=loss_agg)
        if not kl_beta:
            del sums["kl"]
        return loss_sum, sums

    return loss_fn


__all__ = ["LOSS_AGGREGATIONS", "aggregate", "clipped_surrogate", "group_advantages", "grpo_loss",
           "grpo_loss_fn", "k3_kl", "process_advantages"]
