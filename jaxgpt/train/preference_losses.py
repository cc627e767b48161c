"""Preference-tuning losses as pure functions of arrays (float32): Bradley-Terry and DPO.

Both learn from pairs (prompt, chosen response, rejected response):

* Reward model (Bradley-Terry, Ouyang et al. 2022): a scalar score `r` per sequence, trained
  so that `P(chosen > rejected) = sigmoid(r_chosen - r_rejected)`:

      pairwise_loss = -log sigmoid(r_chosen - r_rejected)

* DPO (Rafailov et al. 2023; Raschka ch. 7 notebook): no reward model; the policy's summed
  response log-probs `pi_*` are compared with a frozen reference model's `ref_*`. The
  *implicit reward* of a response is `beta * (pi - ref)`, and

      dpo_loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

  With `label_smoothing` eps > 0 (conservative DPO, cDPO: the preference labels are assumed
  flipped with probability eps) the loss is
  `-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)` with `z` the logit above.

Everything takes per-pair arrays `[batch]` and returns per-pair arrays `[batch]`; callers
weight and sum them (steps.py's `(loss_sum, {"count", ...})` convention). `response_logprobs`
and `dpo_loss_fn` / `reference_fn` apply them to a model and a batch of pairs. No jit here:
the call site (a loss function under `jaxgpt.parallel`) compiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.train.losses import head_logprobs, last_token, response_sum
from jaxgpt.models import lm_head_kernel


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def pairwise_loss(r_chosen, r_rejected):
    """Bradley-Terry loss `-log sigmoid(r_chosen - r_rejected)` per pair: `[batch]`.

    `log_sigmoid` is evaluated stably (`-softplus(-x)`), so large margins neither overflow
    nor lose precision (a margin of -100 gives a loss of 100, not inf)."""
    return -jax.nn.log_sigmoid(_f32(r_chosen) - _f32(r_rejected))


def dpo_logits(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """`beta * ((pi_c - ref_c) - (pi_r - ref_r))` per pair: `[batch]` (the difference of the
    implicit rewards of the chosen and the rejected response)."""
    return _f32(beta) * ((_f32(pi_chosen) - _f32(ref_chosen)) - (_f32(pi_rejected) - _f32(ref_rejected)))


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO loss per pair `[batch]` (cDPO with `label_smoothing` > 0; see the module docstring).

    pi_*/ref_*: `[batch]` summed log-probs of each response given its prompt under the policy
    and the reference (`jaxgpt.train.losses.sequence_logprobs`). Gradients flow through `pi_*` only
    in practice: the reference values are data (precomputed or from frozen params)."""
    z = dpo_logits(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
    eps = _f32(label_smoothing)
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def implicit_rewards(pi_logprobs, ref_logprobs, beta: float):
    """DPO's implicit reward `beta * (pi - ref)` of each response: `[batch]`."""
    return _f32(beta) * (_f32(pi_logprobs) - _f32(ref_logprobs))


def preference_sums(loss, r_chosen, r_rejected, weight=None) -> tuple[jax.Array, dict]:
    """`(loss_sum, sums)` of a batch of pairs, the shape `steps.train_step` expects.

    loss, r_chosen, r_rejected: `[batch]`; weight: `[batch]` (0 on padding rows, None = 1).
    sums: `count` (pairs), `correct` (pairs with r_chosen > r_rejected: the reward / pairwise
    accuracy), `margin` (r_chosen - r_rejected), `chosen_reward`, `rejected_reward`; means
    are sums / count."""
    r_chosen, r_rejected = _f32(r_chosen), _f32(r_rejected)
    w = jnp.ones_like(r_chosen) if weight is None else _f32(weight)
    sums = {
        "count": jnp.sum(w),
        "correct": jnp.sum(w * (r_chosen > r_rejected).astype(jnp.float32)),
        "margin": jnp.sum(w * (r_chosen - r_rejected)),
        "chosen_reward": jnp.sum(w * r_chosen),
        "rejected_reward": jnp.sum(w * r_rejected),
    }
    return jnp.sum(w * _f32(loss)), sums


def response_logprobs(model, params, batch, dropout_key=None):
    """`(logp_chosen [b], logp_rejected [b])`: summed log-probs of each response given its
    prompt (`jaxgpt.train.losses.head_logprobs`: the LM head fused into the log-softmax, so the
    `[2b, t, vocab]` logits are never formed; the same sums as `sequence_logprobs`).

    batch: `chosen`, `rejected` `[b, t]` int32, `chosen_mask`, `rejected_mask` `[b, t]` (1 on
    response tokens), optional `positions [b, w]` int32 (consecutive, starting at or before
    the last prompt token and covering the responses; `jaxgpt.data.preference`). With
    positions the LM head runs on those `w` positions only, and tokens and masks are read
    there: the same sum (the masked-out prompt logits were never needed) at a fraction of
    the head's `[2b, t, vocab]` cost. One forward pass over the `[2b, t]` concatenation."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    positions = batch.get("positions")
    if positions is not None:
        positions = jnp.concatenate([positions, positions])
    hidden = model.apply({"params": params}, tokens, deterministic=dropout_key is None, head_positions=positions,
                         return_hidden=True, rngs=None if dropout_key is None else {"dropout": dropout_key})
    if positions is not None:
        tokens = jnp.take_along_axis(tokens, positions, axis=1)
        mask = jnp.take_along_axis(mask, positions, axis=1)
    per_token = head_logprobs(hidden, lm_head_kernel(model.config, params), tokens)
    return jnp.split(response_sum(per_token, mask), 2)


def reference_fn(ref_model):
    """`fn(ref_params, batch, *, axis_name=None) -> {"ref_chosen", "ref_rejected"}` (`[b]`
    each, dropout off): per-pair values, not sums, so no cross-device reduction."""

    def fn(ref_params, batch, axis_name=None):
        ref_c, ref_r = response_logprobs(ref_model, ref_params, batch)
        return {"ref_chosen": ref_c, "ref_rejected": ref_r}

    return fn


def dpo_loss_fn(model, beta: float, label_smoothing: float = 0.0):
    """`loss_fn(params, batch, dropout_key) -> (loss_sum, sums)` for `steps.train_step`.

    batch: as `response_logprobs`, plus `ref_chosen`, `ref_rejected` `[b]` (the reference's
    log-probs, precomputed) and optional `weight [b]`. Sums: `count`, `correct` (reward
    accuracy), `margin`, `chosen_reward`, `rejected_reward` (implicit rewards)."""

    def loss_fn(params, batch, dropout_key):
        pi_c, pi_r = response_logprobs(model, params, batch, dropout_key)
        ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        loss = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing)
        rewards_c, rewards_r = implicit_rewards(pi_c, ref_c, beta), implicit_rewards(pi_r, ref_r, beta)
        return preference_sums(loss, rewards_c, rewards_r, batch.get("weight"))

    return loss_fn


def reward_loss_fn(model):
    """`loss_fn(params, batch, dropout_key) -> (loss_sum, sums)` of the pairwise loss.

    batch: `chosen`, `rejected` `[b, t]` int32, `chosen_lengths`, `rejected_lengths` `[b]`,
    optional `weight [b]`. Chosen and rejected rows share one forward pass (`[2b, t]`)."""

    def loss_fn(params, batch, dropout_key):
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
        lengths = jnp.concatenate([batch["chosen_lengths"], batch["rejected_lengths"]])
        scores = model.apply({"params": params}, tokens, deterministic=dropout_key is None,
                             rngs=None if dropout_key is None else {"dropout": dropout_key})
        r_chosen, r_rejected = jnp.split(last_token(scores, lengths)[:, 0], 2)
        return preference_sums(pairwise_loss(r_chosen, r_rejected), r_chosen, r_rejected, batch.get("weight"))

    return loss_fn


__all__ = ["dpo_logits", "dpo_loss", "dpo_loss_fn", "implicit_rewards", "pairwise_loss", "preference_sums",
           "reference_fn", "response_logprobs", "reward_loss_fn"]
