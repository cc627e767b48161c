"""The GRPO family's math: group-relative advantages, the policy losses and their aggregation.

For each prompt, G completions are sampled and scored by a verifier; completion i of a
group gets the advantage

    A_i = (r_i - mean(r)) / (std + eps)     scale "group": std of the group (sample std, ddof 1)
                                            scale "batch": std of every reward of the batch
                                            scale "none":  no division (Dr. GRPO)

for every one of its tokens (per-token advantages come from process supervision). With
ratio_t = pi_theta(o_t | ...) / pi_old(o_t | ...), the per-token loss is one of

    clip   -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A)          (GRPO, Dr. GRPO, DAPO, GSPO)
    cispo  -sg(clip(w, 1 - eps_low, 1 + eps_high)) A log pi_theta     (MiniMax-M1's CISPO)

plus an optional KL penalty to the frozen reference, beta * k3_t with
k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (unbiased, >= 0). The importance weight w
is per token (w = ratio_t) or per sequence (GSPO: w = exp(mean_t log ratio_t), the same for
every token of a completion, its gradient flowing to every token). Per-token losses are
aggregated one of three ways:

    sequence   mean over each completion's tokens, then over completions (GRPO, GSPO)
    token      mean over every loss token of the batch (DAPO, CISPO: long completions weigh more)
    constant   sum over the batch's tokens / (completions x L), L the completion budget (Dr. GRPO)

Every function is pure; `grpo_loss_fn` adapts them to the shared `jaxgpt.train.steps.train_step`
as `(loss_sum, {"count": ..., other sums})`, so gradient accumulation and device psums give
the exact batch mean. Named variants and their defaults: `jaxgpt.rl.grpo_variants`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOSS_AGGREGATIONS = ("sequence", "token", "constant")
REWARD_SCALES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")
LOSS_FORMS = ("clip", "cispo")


def _std(x, axis=None, keepdims=False):
    """Sample std (ddof 1); 0 where fewer than two values (one sample: no spread, finite)."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=keepdims))
    return jnp.std(x, axis=axis, keepdims=keepdims, ddof=1)


def _centre_groups(g, scale: str, eps: float):
    """`g` `[groups, k]` minus each group's mean, divided by the group's std ("group"), the
    std of all of `g` ("batch") or nothing ("none")."""
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    if scale == "group":
        return centred / (_std(g, axis=1, keepdims=True) + eps)
    if scale == "batch":
        return centred / (_std(g) + eps)
    if scale != "none":
        raise ValueError(f"reward scale must be one of {REWARD_SCALES}, got {scale!r}")
    return centred


def group_advantages(rewards, group_size: int, *, normalize_std: bool = True, scale: str | None = None,
                     eps: float = 1e-4):
    """Group-relative advantages `[rows]` for rewards `[rows]` (rows = prompts x G, the G
    completions of a prompt adjacent). scale: group | batch | none (see the module docstring;
    None: "group" if normalize_std else "none"). A group with one distinct reward gets 0."""
    scale = scale or ("group" if normalize_std else "none")
    return _centre_groups(jnp.asarray(rewards, jnp.float32).reshape(-1, group_size), scale, eps).reshape(-1)


def process_advantages(step_rewards, segments, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """Per-token advantages `[rows, n]` from per-step rewards (GRPO with process supervision,
    DeepSeekMath sec. 4.1.3): every step reward of a group is centred on the mean of *all*
    step rewards of the group and divided by their std (ddof 1; scale "batch": the std of
    every step reward of the batch; "none": not divided), and a token's advantage is the sum
    of the normalised rewards of its own step and every later step of its completion.

    step_rewards: `[rows, S]` (rows = prompts x G, groups adjacent); segments: `[rows, n]`
    int, the step index of each completion token (values >= S count as the last step)."""
    r = jnp.asarray(step_rewards, jnp.float32)
    rows, steps = r.shape
    norm = _centre_groups(r.reshape(-1, group_size * steps), scale, eps).reshape(rows, steps)
    to_go = jnp.flip(jnp.cumsum(jnp.flip(norm, axis=1), axis=1), axis=1)  # sum over steps >= j
    index = jnp.clip(jnp.asarray(segments, jnp.int32), 0, steps - 1)
    return jnp.take_along_axis(to_go, index, axis=1)


def overlong_penalty(lengths, max_new_tokens: int, buffer: int, factor: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment `[rows]` (eq. 13), added to the reward: 0 up to
    `max_new_tokens - buffer` tokens, then falling linearly to `-factor` at the budget (a
    completion cut there, with no end token, gets the full `-factor`). lengths: `[rows]`
    completion tokens, the end token included (as the rollout counts them)."""
    expected = max_new_tokens - buffer
    over = np.asarray(lengths, np.float32) - expected
    return np.minimum(-over / max(buffer, 1), 0.0).astype(np.float32) * factor


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi_theta || pi_ref) from sampled tokens' log-probs
    (Schulman 2020): exp(ref - logp) - (ref - logp) - 1, elementwise, >= 0."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def clipped_surrogate(logp, old_logp, advantages, clip_low: float, clip_high: float):
    """`(loss [..], clipped [..])`: -min(ratio A, clip(ratio, 1-low, 1+high) A) per token, and
    1.0 where the clipped branch was taken (its gradient is zero there)."""
    return _clip_loss(jnp.exp(logp - old_logp), advantages, clip_low, clip_high)


def _clip_loss(ratio, advantages, clip_low, clip_high):
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def cispo_surrogate(logp, ratio, advantages, clip_low: float, clip_high: float):
    """`(loss, truncated)`: CISPO's -sg(clip(w, 1-low, 1+high)) A log pi per token (MiniMax-M1
    eq. 4-5). Every token keeps a gradient (A times the truncated weight); `truncated` is 1
    where the weight was cut."""
    weight = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = -jax.lax.stop_gradient(weight) * advantages * logp
    return loss, (weight != ratio).astype(jnp.float32) * jnp.ones_like(loss)


def importance_log_ratio(logp, old_logp, mask, level: str):
    """log w: `[b, n]` per token, or `[b, 1]` per sequence (GSPO: the mean log-ratio over the
    completion's loss tokens; a row without any is 0)."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        mask = mask.astype(log_ratio.dtype)
        return (jnp.sum(log_ratio * mask, axis=1, keepdims=True)
                / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0))
    raise ValueError(f"ratio level must be one of {RATIO_LEVELS}, got {level!r}")


def aggregate(per_token, mask, mode: str, constant: float | None = None):
    """`(sum, count)` of `per_token [b, n]` over `mask [b, n]`: per token (sum over tokens,
    count = tokens), per sequence (sum over rows of each row's token mean, count = rows with
    at least one token) or by a constant (sum over tokens, count = rows x `constant`, default
    n). sum / count is the loss; sums add across micro-batches."""
    mask = mask.astype(jnp.float32)
    if mode == "token":
        return jnp.sum(per_token * mask), jnp.sum(mask)
    if mode == "sequence":
        tokens = jnp.sum(mask, axis=1)
        per_row = jnp.sum(per_token * mask, axis=1) / jnp.maximum(tokens, 1.0)
        return jnp.sum(per_row), jnp.sum((tokens > 0).astype(jnp.float32))
    if mode == "constant":
        rows, n = mask.shape
        return jnp.sum(per_token * mask), jnp.asarray(rows * float(constant or n), jnp.float32)
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def _metric_sum(value, mask, mode: str, constant: float | None):
    """A metric's sum such that sum / the loss's count is its mean: aggregated like the loss,
    except under `constant`, where it is the mean over completions of their token means
    (times the constant, the count's per-row share)."""
    if mode != "constant":
        return aggregate(value, mask, mode)[0]
    return aggregate(value, mask, "sequence")[0] * float(constant or mask.shape[1])


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, kl_beta: float = 0.0, loss_agg: str = "sequence",
              ratio_level: str = "token", form: str = "clip", loss_constant: float | None = None):
    """A GRPO-family loss over a batch of completions: `(loss_sum, sums)`.

    logp, old_logp, mask: `[b, n]` (policy now, policy at sampling time; mask 1 on the loss's
    completion tokens); ref_logp: `[b, n]` frozen reference (read only when kl_beta > 0; may
    be None then); advantages: `[b]` (one per completion) or `[b, n]` (per token: process
    supervision). form: clip | cispo; ratio_level: token | sequence; loss_agg: sequence |
    token | constant (loss_constant: its L, default n). sums: `count` (the denominator, see
    `aggregate`), `pg_loss`, `clip_frac`, `ratio`, and `kl` (k3, when kl_beta > 0 or a
    reference is given), each such that sums / count are their means."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages if advantages.ndim == 2 else advantages[:, None]  # per token or per sequence
    ratio = jnp.exp(importance_log_ratio(logp, old_logp, mask, ratio_level))  # [b, n] or [b, 1]
    if form == "clip":
        pg, clipped = _clip_loss(ratio, advantages, clip_eps, high)
    elif form == "cispo":
        pg, clipped = cispo_surrogate(logp, ratio, advantages, clip_eps, high)
    else:
        raise ValueError(f"loss form must be one of {LOSS_FORMS}, got {form!r}")
    shape = logp.shape
    pg, clipped, ratio = (jnp.broadcast_to(x, shape) for x in (pg, clipped, ratio))
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else None
    per_token = pg + kl_beta * kl if kl_beta else pg
    loss_sum, count = aggregate(per_token, mask, loss_agg, loss_constant)
    sums = {"count": count}
    for name, value in (("pg_loss", pg), ("clip_frac", clipped), ("kl", kl), ("ratio", ratio)):
        if value is not None:
            sums[name] = jax.lax.stop_gradient(_metric_sum(value, mask, loss_agg, loss_constant))
    return loss_sum, sums


def grpo_loss_fn(model, *, clip_eps: float, clip_eps_high: float | None, kl_beta: float, loss_agg: str,
                 temperature: float = 1.0, on_policy: bool = False, ratio_level: str = "token",
                 form: str = "clip", loss_constant: float | None = None):
    """`loss_fn(params, batch, dropout_key)` for `jaxgpt.train.steps.train_step`.

    batch: `tokens`, `attention_mask` `[b, P + N]`; `completion_mask`, `old_logprobs` `[b, N]`
    (`ref_logprobs [b, N]` when kl_beta > 0); `advantages [b]` or `[b, N]`. Dropout stays off
    whatever the key: the importance ratio must compare the policy with itself, not with a
    dropped-out copy. temperature: the sampling temperature; log-probs are of the tempered
    policy, so `old_logprobs` and `ref_logprobs` must be too.
    on_policy: each batch gets one update, made with the params that sampled it
    (inner_epochs = minibatches = 1): the old log-probs are then the current ones with the
    gradient stopped (ratio exactly 1) and `old_logprobs` is ignored, which spares the caller
    a forward pass to rescore every batch.
    With kl_beta 0 the reference is not read and `kl` is not a metric (the caller may log
    its own sequence KL, GRPO's `kl_ref`)."""
    from jaxgpt.rl.rollout import completion_logprobs

    def loss_fn(params, batch, dropout_key):
        del dropout_key
        n = batch["completion_mask"].shape[1]
        logp = completion_logprobs(model, params, batch["tokens"], batch["attention_mask"], n,
                                   temperature=temperature)
        old_logp = jax.lax.stop_gradient(logp) if on_policy else batch["old_logprobs"]
        return grpo_loss(logp, old_logp, batch["ref_logprobs"] if kl_beta else None, batch["advantages"],
                         batch["completion_mask"], clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                         kl_beta=kl_beta, loss_agg=loss_agg, ratio_level=ratio_level, form=form,
                         loss_constant=loss_constant)

    return loss_fn


__all__ = ["LOSS_AGGREGATIONS", "LOSS_FORMS", "RATIO_LEVELS", "REWARD_SCALES", "aggregate", "cispo_surrogate",
           "clipped_surrogate", "group_advantages", "grpo_loss", "grpo_loss_fn", "importance_log_ratio", "k3_kl",
           "overlong_penalty", "process_advantages"]
