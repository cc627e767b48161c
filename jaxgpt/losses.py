"""Loss functions as pure functions of arrays. All math here runs in float32.

Losses return a *sum* and a *count* rather than a mean, so that gradient accumulation and
data parallelism can form the exact token-weighted mean across micro-batches and devices.
"""
from __future__ import annotations

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
