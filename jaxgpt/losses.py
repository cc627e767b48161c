"""Loss functions as pure functions of arrays. All math here runs in float32.

Losses return a *sum* and a *count* rather than a mean, so that gradient accumulation and
data parallelism can form the exact token-weighted mean across micro-batches and devices.
`*_loss_fn(model)` adapt them to the model for `jaxgpt.steps.train_step`:
`loss_fn(params, batch, dropout_key) -> (loss_sum, {"count": ..., other sums})`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits, targets, mask=None):
    """Next-token cross-entropy.

    logits: `[batch, seq, vocab]`; targets: `[batch, seq]` int; mask: `[batch, seq]` (1 =
    scored, 0 = ignored, e.g. padding or prompt tokens; None = all scored).
    Returns `(loss_sum, count)`, both float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [batch, seq]
    if mask is None:
        mask = jnp.ones_like(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def token_logprobs(logits, tokens):
    """log p(tokens[:, i] | tokens[:, :i]) for i >= 1, from the logits of `tokens` itself.

    logits: `[batch, seq, vocab]` (the model applied to `tokens [batch, seq]`). Returns
    `[batch, seq - 1]` float32: entry i is the log-prob of token i + 1 (position 0 has no
    prediction). Float32 log-softmax, so bf16 compute does not round the log-probs.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_logprobs(logits, tokens, response_mask):
    """Summed log-prob of each row's response given its prompt: `[batch]` float32.

    logits: `[batch, seq, vocab]` of `tokens [batch, seq]`; response_mask: `[batch, seq]`,
    1 on response tokens (the tokens being scored), 0 on prompt and padding. The first
    token of a row cannot be scored and must not be a response token. Shared by the reward
    model's data, DPO (policy and reference) and the RL losses, so all score the same tokens.
    """
    per_token = token_logprobs(logits, tokens)
    return jnp.sum(per_token * response_mask[:, 1:].astype(jnp.float32), axis=-1)


def last_token(x, lengths):
    """`x[b, lengths[b] - 1]` for `x [b, t, ...]`: each row's last real (non-padding) position."""
    index = jnp.clip(lengths - 1, 0, x.shape[1] - 1).astype(jnp.int32)
    return jnp.take_along_axis(x, index.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def classification_loss_fn(model):
    """`loss_fn(params, batch, dropout_key) -> (ce_sum, {"count", "correct"})`.

    batch: `tokens [b, t]`, `lengths [b]`, `labels [b]` int32, optional `weight [b]` float32
    (0 on the padding rows of the last eval batch)."""

    def loss_fn(params, batch, dropout_key):
        logits = model.apply(
            {"params": params}, batch["tokens"], deterministic=dropout_key is None,
            rngs=None if dropout_key is None else {"dropout": dropout_key},
        )
        logits = last_token(logits, batch["lengths"])  # [b, classes], float32
        labels = batch["labels"]
        weight = batch.get("weight")
        weight = jnp.ones(labels.shape, jnp.float32) if weight is None else weight.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return jnp.sum(ce * weight), {"count": jnp.sum(weight), "correct": jnp.sum(correct * weight)}

    return loss_fn
