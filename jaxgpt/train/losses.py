"""Loss functions as pure functions of arrays. All math here runs in float32.

Losses return a *sum* and a *count* rather than a mean, so that gradient accumulation and
data parallelism can form the exact token-weighted mean across micro-batches and devices.
`*_loss_fn(model)` adapt them to the model for `jaxgpt.train.steps.train_step`:
`loss_fn(params, batch, dropout_key) -> (loss_sum, {"count": ..., other sums})`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxgpt.models.matmuls import bf16_matmul, loop_carried_dots

# Tokens per slice of the fused LM head (`head_cross_entropy`, `head_logprobs`): each slice's
# `[chunk, vocab]` float32 logits (~200 MB at GPT-2's vocabulary) are the largest buffer the
# head ever holds, instead of `[tokens, vocab]` for the whole batch.
HEAD_CHUNK_TOKENS = 1024


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
    return response_sum(token_logprobs(logits, tokens), response_mask)


def response_sum(per_token, response_mask):
    """`[batch]`: per-token log-probs `[batch, seq - 1]` (`token_logprobs`, `head_logprobs`)
    summed over each row's response tokens (`response_mask [batch, seq]`, as above)."""
    return jnp.sum(per_token * response_mask[:, 1:].astype(jnp.float32), axis=-1)


def _chunked(x, *rows, chunk_size: int):
    """`x [n, d]` and `rows` (each `[n]`) cut into `[n_chunks, chunk, ...]` slices, the last
    one zero-padded (callers give padding a zero mask, so it scores nothing)."""
    n = x.shape[0]
    c = max(1, min(chunk_size, n))
    pad = (-n) % c
    out = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (x, *rows)]
    return [a.reshape((-1, c) + a.shape[1:]) for a in out]


def _exp_and_logsumexp(logits):
    """`(e, total, lse)` for `logits [c, vocab]`: `e = exp(logits - max)` `[c, vocab]`, its
    row sums `total [c]` (so softmax is `e / total`) and `lse [c]` = logsumexp(logits).

    On XLA:CPU an exponential fused into a row reduction runs ~10x slower than the same
    exponential as an elementwise pass (measured: 147 vs 13 ms on `[1024, 50257]`), and a
    logsumexp-then-softmax computes it twice. So the exponentials are formed once, kept
    apart from the sum by an optimisation barrier, and reused for the gradient.
    """
    mx = lax.stop_gradient(jnp.max(logits, axis=-1))
    e = jnp.exp(logits - mx[:, None])
    if jax.default_backend() == "cpu":
        e = lax.optimization_barrier(e)
    total = jnp.sum(e, axis=-1)
    return e, total, mx + jnp.log(total)


def _target_logit(logits, targets):
    """`logits[i, targets[i]]` for `logits [c, vocab]`, `targets [c]`."""
    return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


@jax.custom_vjp
def _fused_ce_sum(xs, kernel, ts, ms):
    """Sum of masked cross-entropies over chunks. xs: `[n_chunks, chunk, d]`, kernel
    `[d, vocab]` (same dtype), ts `[n_chunks, chunk]` int32, ms float32 mask."""

    def body(total, chunk):
        xc, tc, mc = chunk
        logits = jnp.dot(xc, kernel, preferred_element_type=jnp.float32)
        return total + jnp.sum((_exp_and_logsumexp(logits)[2] - _target_logit(logits, tc)) * mc), None

    return lax.scan(body, jnp.zeros((), jnp.float32), (xs, ts, ms))[0]


def _fused_ce_fwd(xs, kernel, ts, ms):
    """The loss and its gradients in one pass over the chunks: d loss / d logits is
    `softmax - onehot` per chunk, turned at once into the hidden states' and the kernel's
    gradients, so the backward pass has no logits to recompute or keep. When the kernel is
    frozen (LoRA), its unused accumulator is dead code that XLA removes."""

    cpu_bf16 = kernel.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"

    def body(carry, chunk):
        total, dkernel = carry
        xc, tc, mc = chunk
        logits = jnp.dot(xc, kernel, preferred_element_type=jnp.float32)  # [c, vocab]
        e, row_total, lse = _exp_and_logsumexp(logits)
        total = total + jnp.sum((lse - _target_logit(logits, tc)) * mc)
        probs = e * (mc / row_total)[:, None]  # softmax, masked
        is_target = lax.broadcasted_iota(jnp.int32, logits.shape, 1) == tc[:, None]
        dlogits = jnp.where(is_target, probs - mc[:, None], probs).astype(xc.dtype)
        if cpu_bf16:  # keep both matmuls on the bf16 kernels (see `loop_carried_dots`)
            dx, dk = loop_carried_dots((dlogits, kernel.T), (xc.T, dlogits))
        else:
            dx = jnp.dot(dlogits, kernel.T, preferred_element_type=jnp.float32)
            dk = jnp.dot(xc.T, dlogits, preferred_element_type=jnp.float32)
        return (total, dkernel + dk), dx.astype(xc.dtype)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (total, dkernel), dxs = lax.scan(body, init, (xs, ts, ms))
    return total, (dxs, dkernel.astype(kernel.dtype))


def _fused_ce_bwd(residuals, g):
    dxs, dkernel = residuals
    return (g.astype(dxs.dtype) * dxs, g.astype(dkernel.dtype) * dkernel, None, None)


_fused_ce_sum.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def head_cross_entropy(hidden, kernel, targets, mask=None, *, chunk_size: int = HEAD_CHUNK_TOKENS):
    """`token_cross_entropy(hidden @ kernel, targets, mask)` with the LM head fused into the loss.

    hidden: `[..., n_embd]` (final-LayerNorm states, compute dtype); kernel: `[n_embd, vocab]`
    (`jaxgpt.models.lm_head_kernel`); targets, mask: `[...]`. The head and the loss run over
    `chunk_size`-token slices, and the gradient is formed slice by slice in the same pass,
    so neither the `[tokens, vocab]` logits nor their gradient is ever materialised: at
    GPT-2's vocabulary they are the largest buffers of a training step. Logits are float32
    (the matmul accumulates in float32 whatever the compute dtype).
    Returns `(loss_sum, count)`, float32 scalars.
    """
    d = hidden.shape[-1]
    m = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    xs, ts, ms = _chunked(hidden.reshape(-1, d), targets.reshape(-1).astype(jnp.int32), m.reshape(-1),
                          chunk_size=chunk_size)
    return _fused_ce_sum(xs, kernel.astype(hidden.dtype), ts, ms), jnp.sum(m)


def head_logprobs(hidden, kernel, tokens, *, temperature: float = 1.0, chunk_size: int = HEAD_CHUNK_TOKENS):
    """`token_logprobs(hidden @ kernel / temperature, tokens)` without the `[batch, seq, vocab]`
    logits: `[batch, seq - 1]` float32, entry i the log-prob of token i + 1.

    hidden: `[batch, seq, n_embd]`, the states of `tokens [batch, seq]`; kernel: `[n_embd,
    vocab]`. The head runs over `chunk_size`-token slices whose logits are recomputed in the
    backward pass (`jax.checkpoint`): per-token log-probs get a per-token cotangent, so the
    gradient cannot be formed ahead as `head_cross_entropy` does. What DPO's and the RL
    losses' log-probs use.
    """
    b, t, d = hidden.shape
    kernel = kernel.astype(hidden.dtype)
    targets = tokens[:, 1:].astype(jnp.int32).reshape(-1)
    xs, ts = _chunked(hidden[:, :-1].reshape(-1, d), targets, chunk_size=chunk_size)

    cpu_bf16 = kernel.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"

    @jax.checkpoint
    def one(xc, tc):
        if cpu_bf16:  # its gradient matmuls on the bf16 kernels too (see `bf16_matmul`)
            logits = bf16_matmul(xc, kernel, jnp.float32)
        else:
            logits = jnp.dot(xc, kernel, preferred_element_type=jnp.float32)
        if temperature != 1.0:
            logits = logits / temperature
        return _target_logit(logits, tc) - _exp_and_logsumexp(logits)[2]

    per_token = lax.map(lambda chunk: one(*chunk), (xs, ts)).reshape(-1)
    return per_token[: b * (t - 1)].reshape(b, t - 1)


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
