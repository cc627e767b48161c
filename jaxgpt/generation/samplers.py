"""Sampling one token per row from logits `[batch, vocab]`, with static shapes so it can sit
inside `jit`, `lax.scan` or `lax.while_loop`: greedy (temperature 0), temperature, top-k,
top-p (nucleus), a repetition penalty, and the token draw itself (a Gumbel variate per vocabulary entry, or an exact
inverse-CDF draw that is ~30x cheaper on a CPU), and which sampled ids end a row (`ends_row`: one
eos, or several). `jaxgpt.generation.decode` builds the decode loop on it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _mask_vocab(logits: Array, vocab_limit: int | None) -> Array:
    """-inf on ids >= vocab_limit (padded embedding rows that are no real token)."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(ids < vocab_limit, logits, -jnp.inf)


SAMPLERS = ("gumbel", "inverse_cdf")


def categorical_inverse_cdf(key: Array, logits: Array, block: int = 256) -> Array:
    """Exact categorical sampling from logits `[batch, vocab]` -> `[batch]` int32 by inverting
    the CDF with one uniform per row, in two levels (blocks of `block` ids, then an id in
    the chosen block), so only `[batch, vocab / block]` and `[batch, block]` cumsums are formed.

    Same distribution as `jax.random.categorical` (different draws for a key). That draws
    a Gumbel variate per vocabulary entry, which on CPU costs ~30x the rest of a small
    model's decode step at vocab 50257; this draws `batch` uniforms. Ids with zero
    probability are never returned (float rounding at a boundary falls back to the last id
    of nonzero probability)."""
    b, v = logits.shape
    nb = -(-v // block)
    logits = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, nb * block - v)), constant_values=-jnp.inf)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).reshape(b, nb, block)

    def last_nonzero(x):  # [b, n] -> [b]: index of the last entry > 0
        n = x.shape[-1]
        return n - 1 - jnp.argmax(jnp.flip(x > 0, axis=-1), axis=-1)

    sums = jnp.sum(p, axis=-1)  # [b, nb]
    csum = jnp.cumsum(sums, axis=-1)
    u = jax.random.uniform(key, (b,), jnp.float32) * csum[:, -1]
    blk = jnp.minimum(jnp.sum(csum <= u[:, None], axis=-1), last_nonzero(sums))
    take = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
    rest = u - (take(csum, blk) - take(sums, blk))
    row = jnp.take_along_axis(p, blk[:, None, None], axis=1)[:, 0]  # [b, block]
    idx = jnp.minimum(jnp.sum(jnp.cumsum(row, axis=-1) <= rest[:, None], axis=-1), last_nonzero(row))
    return (blk * block + idx).astype(jnp.int32)


def repetition_penalty(logits: Array, seen: Array, penalty) -> Array:
    """Hugging Face's `RepetitionPenaltyLogitsProcessor` (Keskar et al., 2019): the logits
    `[b, V]` of the ids already in a row (`seen` `[b, V]` bool) divided by `penalty` where
    positive and multiplied by it where negative, so `penalty > 1` makes repeats less likely."""
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def _sample(logits, key, *, temperature, greedy: bool, top_k, top_p, vocab_limit, method: str = "gumbel",
            scores=None):
    """(tokens [b] int32, logprobs [b] float32) for logits `[b, V]` float32.

    `greedy`, `top_k` and whether `top_p` is None are static; `temperature` and the top-p
    value may be traced (changing them does not recompile). `logprobs` are the sampled
    tokens' log-probabilities under the model's own distribution (temperature 1, no
    filtering), which is what policy-gradient losses recompute at training time.
    scores: `[b, V]` the token is chosen from instead of the logits (repetition-penalised);
    the log-probs stay the logits'.
    """
    logits = _mask_vocab(logits.astype(jnp.float32), vocab_limit)
    top = jnp.max(logits, axis=-1, keepdims=True)
    raw, raw_top = logits, top
    if scores is not None:
        logits = _mask_vocab(scores.astype(jnp.float32), vocab_limit)
        top = jnp.max(logits, axis=-1, keepdims=True)
    if greedy:
        tokens = first_argmax(logits, top)
    else:
        temperature = jnp.asarray(temperature, jnp.float32)
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        if top_k is None and top_p is None and method == "inverse_cdf":
            sampled = categorical_inverse_cdf(key, logits / safe_t)
        elif top_k is None and top_p is None:
            sampled = jax.random.categorical(key, logits / safe_t, axis=-1)
        else:
            # Work in sorted (descending) space: lax.top_k with k = V is a full sort.
            # Ties keep the lower id first, and exactly k entries survive top-k.
            k = min(top_k or logits.shape[-1], logits.shape[-1])
            vals, ids = jax.lax.top_k(logits, k)  # [b, k], sorted descending
            vals = vals / safe_t
            if top_p is not None:
                probs = jax.nn.softmax(vals, axis=-1)
                # Mass strictly before each entry; keep entries while it is < p, i.e. the
                # smallest prefix whose cumulative probability reaches p (always >= 1 token).
                before = jnp.cumsum(probs, axis=-1) - probs
                keep = (before < top_p).at[:, 0].set(True)
                vals = jnp.where(keep, vals, -jnp.inf)
            choice = jax.random.categorical(key, vals, axis=-1)
            sampled = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
        # A traced temperature of 0 still means greedy.
        tokens = jnp.where(temperature > 0, sampled, first_argmax(logits, top)).astype(jnp.int32)
    # log_softmax at the sampled ids only (jax.nn.log_softmax's arithmetic, no [b, V] output).
    shifted_lse = jnp.log(jnp.sum(jnp.exp(raw - jax.lax.stop_gradient(raw_top)), axis=-1))
    logprobs = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - raw_top[:, 0] - shifted_lse
    return tokens, logprobs


def first_argmax(logits: Array, top: Array | None = None) -> Array:
    """`jnp.argmax(logits, axis=-1)` as int32 (the first maximal id; the first NaN if any) for
    logits `[b, V]`, given their max `top` `[b, 1]` or not. Two plain reductions (max, then
    the least id holding it) instead of XLA's variadic (value, index) reduce, which XLA:CPU
    does not vectorise: at V = 50257, 63 against 259 us a decode step on an AVX-512 EPYC."""
    if top is None:
        top = jnp.max(logits, axis=-1, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, ids, logits.shape[-1]), axis=-1)


def sample_logits(
    logits: Array,
    key: Array,
    *,
    temperature: float | Array = 1.0,
    top_k: int | None = None,
    top_p: float | Array | None = None,
    vocab_limit: int | None = None,
) -> Array:
    """Sample one token per row from logits `[batch, vocab]` (float32) -> `[batch]` int32.

    temperature: 0 means greedy argmax (a Python 0 skips sampling entirely; a traced 0
    selects the argmax). top_k: keep the k most likely tokens (static int). top_p: keep the
    smallest set of most likely tokens whose cumulative probability (after temperature and
    top-k) is >= p; the top token is always kept. vocab_limit: ids >= this are never
    sampled (for vocabularies padded beyond the tokenizer's). Shapes are static, so this is
    jit-friendly.
    """
    greedy = _is_number(temperature) and temperature == 0
    tokens, _ = _sample(logits, key, temperature=temperature, greedy=greedy, top_k=top_k,
                        top_p=top_p, vocab_limit=vocab_limit)
    return tokens


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
def ends_row(tok, eos_ids: tuple[int, ...] | None):
    """`[b]` bool: which of the tokens `tok [b]` end their row (any id of `eos_ids`)."""
    done = jnp.zeros(tok.shape, bool)
    for i in eos_ids or ():
        done = done | (tok == i)
    return done


def as_stop_ids(eos_id) -> tuple[int, ...] | None:
    """`eos_id` (None, an id, or a sequence of ids) as the tuple of ids the decode loop stops on."""
    if eos_id is None:
        return None
    ids = tuple(int(i) for i in np.atleast_1d(np.asarray(eos_id)).ravel())
    return ids or None
