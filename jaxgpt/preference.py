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
weight and sum them (steps.py's `(loss_sum, {"count", ...})` convention). No jit here: the
call site (a loss function under `jaxgpt.parallel`) compiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
    and the reference (`jaxgpt.losses.sequence_logprobs`). Gradients flow through `pi_*` only
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


__all__ = ["dpo_logits", "dpo_loss", "implicit_rewards", "pairwise_loss", "preference_sums"]
