"""PPO for RLHF (Ouyang et al. 2022; Stiennon et al. 2020) as pure functions.

The policy is a GPT whose final hidden states also feed a scalar *value head*
(`build_model(cfg, value_head=True)`: `value_head/{kernel [n_embd, 1], bias}`, zero-initialised), so one
forward pass gives both the next-token log-probs and the values. (A separate `num_classes=1` critic would
be the other choice; sharing the trunk halves the compute of every rollout and update, which
decides what a CPU can train, at the price of value gradients reaching the policy's
trunk, weighted by `vf_coef`.)

Per completion of n tokens (token t sampled after state s_t = prompt + tokens < t):

    r_t   = -kl_coef * (logp_old_t - logp_ref_t)   + score * [t == last token]
    delta = r_t + gamma * V(s_{t+1}) - V(s_t)         (V after the last token = 0)
    A_t   = delta_t + gamma * lam * A_{t+1}             (GAE, Schulman et al. 2016)
    R_t   = A_t + V(s_t)                               (the value target)

`score` is the frozen reward model's scalar for prompt + completion, and the per-token KL
penalty keeps the policy near the frozen reference. Losses, per completion token:

    policy  -min(ratio A, clip(ratio, 1 +- clip_eps) A)      (A whitened over the batch)
    value   0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-value_clip) - R)^2)

summed as `policy + vf_coef * value` and averaged over every completion token of the batch
(`(loss_sum, {"count": tokens, ...})` for the shared `jaxgpt.train.steps.train_step`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.rl.grpo import clipped_surrogate

def kl_penalized_rewards(scores, logp, ref_logp, mask, kl_coef: float):
    """Per-token rewards `[b, n]`: -kl_coef * (logp - ref_logp) on completion tokens, plus
    each row's reward-model score `[b]` at its last completion token (mask `[b, n]`)."""
    mask = mask.astype(jnp.float32)
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
    at_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * (jnp.sum(mask, axis=1, keepdims=True) > 0)
    return rewards + at_last * scores[:, None]


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
    """`(advantages, returns)` `[b, n]` by generalised advantage estimation, a reverse
    `lax.scan` over time. Completion tokens are a prefix of each row (mask `[b, n]`); the
    value after a row's last token is 0; masked positions get 0."""
    mask = mask.astype(jnp.float32)
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values * next_mask - values) * mask

    def step(carry, inputs):
        delta, m_next = inputs
        adv = delta + gamma * lam * carry * m_next
        return adv, adv

    _, adv = lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32), (deltas.T, next_mask.T), reverse=True)
    adv = adv.T * mask
    return adv, (adv + values) * mask


def whiten(x, mask, eps: float = 1e-8):
    """`(x - mean) / std` over the masked entries (population std); masked-out entries -> 0."""
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(x * mask) / n
    var = jnp.sum(((x - mean) * mask) ** 2) / n
    return (x - mean) * lax.rsqrt(var + eps) * mask


def ppo_loss(logp, old_logp, advantages, values, old_values, returns, mask, *, clip_eps: float = 0.2,
             value_clip: float = 0.2, vf_coef: float = 0.1):
    """`(loss_sum, sums)` over completion tokens (all `[b, n]`; see the module docstring).

    sums: `count` (tokens), `pg_loss`, `value_loss`, `clip_frac`, `value_clip_frac`,
    `approx_kl` ((ratio - 1) - log ratio: the k3 KL(old || new) estimate), each a sum over
    tokens, so sums / count are token means."""
    mask = mask.astype(jnp.float32)
    pg, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps, clip_eps)
    v_clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    vf_plain, vf_clip = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf = 0.5 * jnp.maximum(vf_plain, vf_clip)
    per_token = pg + vf_coef * vf
    log_ratio = logp - old_logp
    stats = {"pg_loss": pg, "value_loss": vf, "clip_frac": clipped,
             "value_clip_frac": (vf_clip > vf_plain).astype(jnp.float32),
             "approx_kl": jnp.exp(log_ratio) - 1.0 - log_ratio}
    sums = {"count": jnp.sum(mask)}
    sums.update({k: lax.stop_gradient(jnp.sum(v * mask)) for k, v in stats.items()})
    return jnp.sum(per_token * mask), sums


def policy_and_values(model, params, tokens, attention_mask, n: int, temperature: float = 1.0):
    """`(logp [b, n], values [b, n])` of the last n tokens from one pass of the trunk: the
    LM head and the value head of `model` (`build_model(cfg, value_head=True)`) on the same hidden states."""
    from jaxgpt.train.losses import head_logprobs
    from jaxgpt.models import lm_head_kernel
    from jaxgpt.rl.rollout import completion_hidden

    hidden = completion_hidden(model, params, tokens, attention_mask, n)  # [b, n + 1, d]
    logp = head_logprobs(hidden, lm_head_kernel(model.config, params), tokens[:, -(n + 1):], temperature=temperature)
    return logp, model.apply({"params": params}, hidden[:, :-1], method="values")


def ppo_loss_fn(model, *, clip_eps: float, value_clip: float, vf_coef: float, temperature: float = 1.0):
    """`loss_fn(params, batch, dropout_key)` for `jaxgpt.train.steps.train_step` (dropout off).

    batch: `tokens`, `attention_mask` `[b, P + N]`; `completion_mask`, `old_logprobs`,
    `old_values`, `advantages`, `returns` `[b, N]`."""

    def loss_fn(params, batch, dropout_key):
        del dropout_key
        n = batch["completion_mask"].shape[1]
        logp, values = policy_and_values(model, params, batch["tokens"], batch["attention_mask"], n, temperature)
        return ppo_loss(logp, batch["old_logprobs"], batch["advantages"], values, batch["old_values"],
                        batch["returns"], batch["completion_mask"], clip_eps=clip_eps, value_clip=value_clip,
                        vf_coef=vf_coef)

    return loss_fn


__all__ = ["gae", "kl_penalized_rewards", "policy_and_values", "ppo_loss", "ppo_loss_fn", "whiten"]
