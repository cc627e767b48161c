"""Text generation: logit filtering, a jitted KV-cache decode loop, and a string-level API.

Three layers, each usable on its own from research code:

* `sample_logits(logits [batch, vocab], key, ...)` -> tokens `[batch]` (`jaxgpt.generation.samplers`,
  re-exported here): greedy (temperature 0), temperature, top-k and top-p (nucleus) sampling
  with static shapes, so it can sit inside `jit`, `lax.scan` or `lax.while_loop`.
* `generate_tokens(params, config, prompt_tokens, prompt_mask, key, ...)` -> a dict of
  `tokens`, `mask`, `logprobs`, `lengths` (`[batch, max_new_tokens]` / `[batch]`). One jitted
  function: it prefills a fixed-size KV cache (`P + max_new_tokens` slots) with the whole
  left-padded prompt in one model call, then decodes a token per `lax.while_loop` step
  (`decode_loop`) until every row has emitted `eos_id` (one id, or several: a chat model's
  eos and its template's end of an answer). The rollout engine of RL fine-tuning too.
* `generate(params, config, prompts, ...)` -> `list[str]`: tokenize, left-pad (prompt length
  bucketed so different lengths reuse compilations), generate, decode.

Prompts are LEFT-padded so that every row's last prompt token sits in the same cache slot
and all rows share one cache write index; positions are `cumsum(mask) - 1`, so the padding
does not shift a row's positions and a padded row decodes exactly like the same prompt alone.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.models import build_model, init_cache
from jaxgpt.models.kv_cache import repeat_rows
from jaxgpt.generation.stream import TextStream, check_stop_strings, host_stop, registered_sink, text_sink
from jaxgpt.generation.samplers import (SAMPLERS, _is_number, _sample, as_stop_ids,  # noqa: F401
                                        categorical_inverse_cdf, ends_row, repetition_penalty, sample_logits)

Array = jax.Array

PROMPT_BUCKET = 16  # prompt lengths are rounded up to a multiple of this (see `pad_prompts`)

def trace_count() -> int:
    """How many programs the jitted decode loop holds compiled (one per static signature)."""
    return _generate_jit._cache_size()


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty=None) -> None:
    """UserError (naming the CLI flag) for out-of-range sampling settings.

    Array-valued temperature / top_p (traced settings from research code) are not checked.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be an integer >= 0, got {max_new_tokens!r}")
    if _is_number(temperature) and not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise UserError(f"--top-k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and _is_number(top_p) and not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if repetition_penalty is not None and not (_is_number(repetition_penalty) and math.isfinite(repetition_penalty)
                                               and repetition_penalty > 0):
        raise UserError(f"--repetition-penalty must be a number > 0 (1 = none; e.g. 1.2), got {repetition_penalty!r}")


def check_fits(prompt_len: int, max_new_tokens: int, context_length: int) -> None:
    """UserError when a prompt and its new tokens overflow the context (never truncated)."""
    if prompt_len + max_new_tokens > context_length:
        raise UserError(f"prompt of {prompt_len} tokens plus --max-new-tokens {max_new_tokens} exceeds the "
                        f"model's context of {context_length}; shorten the prompt or lower --max-new-tokens")


# ---------------------------------------------------------------------------------------
# The jitted decode loop


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "greedy", "top_k", "use_top_p", "eos_id",
                     "pad_id", "vocab_limit", "method", "stream", "use_penalty", "group_size"),
)
def _generate_jit(params, prompt_tokens, prompt_mask, key, temperature, top_p, sink=0, penalty=1.0, *, config,
                  max_new_tokens, greedy, top_k, use_top_p, eos_id, pad_id, vocab_limit, method="gumbel",
                  stream=False, use_penalty=False, group_size=1):
    b, p = prompt_tokens.shape
    model = build_model(config)
    mask = prompt_mask.astype(bool)
    n_real = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [b]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)  # [b, P]
    # Prefill: the whole prompt in one call; the last column is every row's last real token.
    cache = init_cache(config, b, p + max_new_tokens)
    # last_only: the head runs on the final position alone, never on `[b, P, V]`.
    logits, cache = model.apply({"params": params}, prompt_tokens, positions=positions,
                                attention_mask=mask, cache=cache, last_only=True)
    if group_size > 1:  # each prompt prefilled once; its cache and last logits copied to its samples' rows
        cache = repeat_rows(cache, group_size)
        logits, n_real, prompt_tokens, mask = (jnp.repeat(x, group_size, axis=0)
                                               for x in (logits, n_real, prompt_tokens, mask))
        b *= group_size
    seen = None  # [b, V] bool: the ids in each row so far (prompt and output), for the repetition penalty
    if use_penalty:
        seen = jnp.zeros((b, logits.shape[-1]), jnp.int32).at[jnp.arange(b)[:, None], prompt_tokens].add(mask) > 0
    pick = picker(temperature, top_p, penalty, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                  vocab_limit=vocab_limit, method=method)
    tokens, logprobs, cmask, _ = decode_loop(model, params, cache, logits[:, 0], n_real, key, pick, seen, sink,
                                             max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                             stream=stream)
    return {"tokens": tokens, "mask": cmask, "logprobs": logprobs,
            "lengths": jnp.sum(cmask, axis=1, dtype=jnp.int32)}


def picker(temperature, top_p, penalty, *, greedy, top_k, use_top_p, vocab_limit, method):
    """`pick(logits [b, V], key, seen) -> (tokens [b], logprobs [b])`: `_sample` with these
    settings, scoring by the repetition penalty where `seen` (`[b, V]` bool) is given."""
    sample = functools.partial(_sample, temperature=temperature, greedy=greedy, top_k=top_k,
                               top_p=top_p if use_top_p else None, vocab_limit=vocab_limit, method=method)

    def pick(logits, key, seen):
        scores = None if seen is None else repetition_penalty(logits, seen, penalty)
        return sample(logits, key, scores=scores)

    return pick


def decode_loop(model, params, cache, logits, n_real, key, pick, seen, sink, *, max_new_tokens, eos_id, pad_id,
                stream):
    """Token 0 from the prompt's last logits `[b, V]`, then one token per `lax.while_loop`
    step through `cache` (which holds the prompt; `n_real [b]`: its real tokens a row, so token
    i is fed at position `n_real + i`). Rows end at an id of `eos_id` (a tuple of ids, or None)
    or when the host sink says so.
    Returns `(tokens, logprobs, mask)`, each `[b, max_new_tokens]`, and the cache after the
    last token fed (every sampled token but the last)."""
    b, n = logits.shape[0], max_new_tokens
    rows = jnp.arange(b)
    tok, lp = pick(logits, jax.random.fold_in(key, 0), seen)
    if seen is not None:
        seen = seen.at[rows, tok].set(True)
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
    logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
    cmask = jnp.zeros((b, n), bool).at[:, 0].set(True)
    done = ends_row(tok, eos_id)
    if stream:
        done = done | host_stop(sink, 0, tok, jnp.ones((b,), bool))

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, prev, done, tokens, logprobs, cmask, seen = carry
        # Feed the previous token (at position n_real + i - 1), sample token i.
        logits, cache = model.apply({"params": params}, prev[:, None],
                                    positions=(n_real + i - 1)[:, None],
                                    attention_mask=jnp.ones((b, 1), bool), cache=cache)
        tok, lp = pick(logits[:, 0], jax.random.fold_in(key, i), seen)
        tok = jnp.where(done, pad_id, tok)  # finished rows emit padding, not counted
        if seen is not None:
            seen = seen.at[rows, tok].set(True)
        lp = jnp.where(done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, i))
        cmask = jax.lax.dynamic_update_slice(cmask, ~done[:, None], (0, i))
        stop = host_stop(sink, i, tok, ~done) if stream else False
        done = done | stop | ends_row(tok, eos_id)
        return i + 1, cache, tok, done, tokens, logprobs, cmask, seen

    carry = (jnp.int32(1), cache, tok, done, tokens, logprobs, cmask, seen)
    _, cache, _, _, tokens, logprobs, cmask, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, cmask, cache


def generate_tokens(
    params,
    config: ModelConfig,
    prompt_tokens: Array,
    prompt_mask: Array,
    key: Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
    vocab_limit: int | None = None,
    method: str = "gumbel",
    on_token: Callable[[int, np.ndarray, np.ndarray], Any] | None = None,
    repetition_penalty: float | None = None,
    group_size: int = 1,
) -> dict[str, Array]:
    """Sample `max_new_tokens` continuation tokens for a left-padded batch of prompts.

    prompt_tokens: `[batch, P]` int32, LEFT-padded; prompt_mask: `[batch, P]` bool, True on
    real tokens (each row needs at least one). `P + max_new_tokens` must not exceed
    `config.context_length` (that is the cache size).

    Returns a dict:
      tokens `[batch, max_new_tokens]` int32: sampled ids; after a row emits `eos_id` it
        emits `pad_id` (default: `eos_id`, else 0). eos_id may be several ids (a row ends at
        any of them; the first pads): an instruction model's eos and its chat template's end
        of an answer (`Tokenizer.stop_ids`).
      mask `[batch, max_new_tokens]` bool: True on completion tokens (the eos included).
      logprobs `[batch, max_new_tokens]` float32: log p(token) under the model's
        untempered, unfiltered distribution; 0 where mask is False.
      lengths `[batch]` int32: completion lengths, `mask.sum(1)`.

    repetition_penalty: > 1 makes the ids already in a row (its prompt and what it has
    generated) less likely, as transformers' `repetition_penalty` does (`samplers.repetition_penalty`;
    None or 1 is off and compiles no `[batch, vocab]` record of them). The log-probs stay the model's.

    method: how plain temperature sampling (no top-k / top-p) draws a token: "gumbel"
    (`jax.random.categorical`) or "inverse_cdf" (`categorical_inverse_cdf`: the same
    distribution, one uniform per row; much faster on CPU, used by RL rollouts).

    on_token: called on the host as each token is sampled, in order, while the loop runs:
    `on_token(step, tokens [batch] int32, live [batch] bool)`, `live` False on rows that had
    already finished (their token is padding). It may return True, or a `[batch]` bool, to
    end those rows after this token (stop strings, a user's Ctrl-C); None goes on. This is
    what streams text (`jaxgpt.generation.stream`); the loop waits for each call, so keep it
    short. Without it the compiled loop has no host callback at all.

    group_size: G samples of each prompt, in rows `i * G .. i * G + G - 1` of the outputs
    (`[batch * G, ...]`). Each prompt is prefilled once and its KV cache copied to its G rows
    (GRPO's groups: the prefill costs a G-th of that of the prompts repeated).

    Compiled once per (config, shapes, max_new_tokens, top_k, greedy-or-not, top-p on/off,
    eos_id, method); temperature, the top-p value, the key and the params are traced.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, bool)
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask "
                         f"{prompt_mask.shape} must both be [batch, P]")
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    b, p = prompt_tokens.shape
    b *= group_size
    check_fits(p, max_new_tokens, config.context_length)
    traced, static = sampling_settings(temperature, top_k, top_p, eos_id, pad_id, vocab_limit, method,
                                       repetition_penalty)
    if max_new_tokens == 0:
        return {"tokens": jnp.zeros((b, 0), jnp.int32), "mask": jnp.zeros((b, 0), bool),
                "logprobs": jnp.zeros((b, 0), jnp.float32), "lengths": jnp.zeros((b,), jnp.int32)}
    with registered_sink(on_token) as sink:
        out = _generate_jit(params, prompt_tokens, prompt_mask, key, sink=jnp.int32(sink), **traced, config=config,
                            max_new_tokens=int(max_new_tokens), stream=on_token is not None,
                            group_size=int(group_size), **static)
        return jax.block_until_ready(out) if on_token is not None else out


def sampling_settings(temperature, top_k, top_p, eos_id, pad_id, vocab_limit, method, repetition_penalty):
    """`generate_tokens`' sampling arguments as the jitted loops take them: `(traced, static)`
    keyword dicts. top_p = 1 keeps everything, so it skips the sort (an array top_p is always
    applied); a penalty of None or 1 compiles no record of the ids seen."""
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {SAMPLERS}, got {method!r}")
    use_top_p = top_p is not None and not (_is_number(top_p) and top_p >= 1.0)
    eos_id = as_stop_ids(eos_id)
    if pad_id is None:
        pad_id = eos_id[0] if eos_id is not None else 0
    traced = {"temperature": jnp.asarray(temperature, jnp.float32),
              "top_p": jnp.asarray(top_p if use_top_p else 1.0, jnp.float32),
              "penalty": jnp.asarray(repetition_penalty or 1.0, jnp.float32)}
    static = {"greedy": _is_number(temperature) and temperature == 0, "top_k": None if top_k is None else int(top_k),
              "use_top_p": use_top_p, "eos_id": eos_id, "pad_id": int(pad_id),
              "vocab_limit": None if vocab_limit is None else int(vocab_limit), "method": method,
              "use_penalty": repetition_penalty is not None and repetition_penalty != 1}
    return traced, static


# ---------------------------------------------------------------------------------------
# Token lists and strings


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    context_length: int,
    pad_id: int = 0,
    bucket: int = PROMPT_BUCKET,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into `([batch, P] int32, [batch, P] bool)`.

    P is the longest prompt rounded up to a multiple of `bucket`, so prompts of nearby
    lengths share one compilation of `generate_tokens`; the rounding never pushes
    `P + max_new_tokens` past `context_length`. Raises UserError on an empty prompt or one
    that does not fit in the context with `max_new_tokens` (no silent truncation).
    """
    if not prompts:
        raise UserError("no prompt given")
    longest = 0
    for ids in prompts:
        if len(ids) == 0:
            raise UserError("empty prompt; give at least one token of text")
        check_fits(len(ids), max_new_tokens, context_length)
        longest = max(longest, len(ids))
    p = max(longest, min(-(-longest // bucket) * bucket, context_length - max_new_tokens))
    tokens = np.full((len(prompts), p), pad_id, np.int32)
    mask = np.zeros((len(prompts), p), bool)
    for row, ids in enumerate(prompts):
        tokens[row, p - len(ids):] = ids
        mask[row, p - len(ids):] = True
    return tokens, mask


def _encode(tokenizer, text: str) -> list[int]:
    try:  # a tiktoken Encoding refuses special-token text unless allowed
        return list(tokenizer.encode(text, allowed_special="all"))
    except TypeError:  # jaxgpt's tokenizers allow it already
        return list(tokenizer.encode(text))


def generate(
    params,
    config: ModelConfig,
    prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    key: Array | None = None,
    stop_at_eos: bool = True,
    eos_id: int | Sequence[int] | None = None,
    tokenizer: Any = None,
    stop: Sequence[str] = (),
    on_text: Callable[[int, str], None] | None = None,
    prompt_bucket: int = PROMPT_BUCKET,
    repetition_penalty: float | None = None,
    session: Any = None,
) -> list[str]:
    """Continue each prompt; returns the generated text only, one string per prompt.

    prompts: a string, a list of strings, a list of token ids, or a list of such lists
    (a single prompt still returns a one-element list). Text is encoded with `tokenizer`
    (default: the model's, `config.tokenizer`: GPT-2's BPE unless the model names another;
    any object with `encode`/`decode` works). The batch is left-padded with the prompt length
    bucketed (see `pad_prompts`) and run through `generate_tokens`; the continuation is cut
    before the first eos (`eos_id`, default the tokenizer's `end_ids`: GPT-2's `<|endoftext|>` =
    50256, and every end a model's generation_config.json lists; several ids end it at any of
    them) when `stop_at_eos`. A prompt that does not fit in the context together with
    `max_new_tokens` is an error (UserError), not truncated.

    stop: strings that end a row's text where they first appear (the text stops before them,
    and so does that row's decoding). on_text: `on_text(row, text)` with each piece of a row's
    text as soon as it is decoded (streaming); the pieces of a row add up to its result. If it
    returns True, that row ends there (a user's Ctrl-C in `python -m jaxgpt chat`).
    Either one runs the loop with a host callback per token (`generate_tokens(on_token=...)`).
    prompt_bucket: prompt lengths are padded up to a multiple of it, so that prompts of nearby
    lengths share a compiled loop (a chat whose history grows wants a larger one).
    session: a `jaxgpt.generation.session.DecodeSession` for these params: one prompt, decoded
    on the KV cache the session kept from its last call, prefilling only what this prompt adds.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    stop = check_stop_strings(stop)
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
        prompts = [prompts]  # one prompt given as token ids
    if not prompts:
        raise UserError("no prompt given")
    if tokenizer is None:
        from jaxgpt.text.tokenizer import tokenizer_of

        tokenizer = tokenizer_of(config)
    token_lists = [_encode(tokenizer, p) if isinstance(p, str) else [int(t) for t in p]
                   for p in prompts]
    for ids in token_lists:
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the model's vocabulary of {config.vocab_size}")
    if stop_at_eos and eos_id is None:  # every end the model's generation_config lists; tiktoken's eot_token
        eos_id = (getattr(tokenizer, "end_ids", None)
                  or getattr(tokenizer, "eos_id", getattr(tokenizer, "eot_token", None)))
    eos_id = as_stop_ids(eos_id) if stop_at_eos else None
    tokens, mask = pad_prompts(token_lists, max_new_tokens=max_new_tokens,
                               context_length=config.context_length, bucket=prompt_bucket)
    if key is None:
        key = jax.random.key(seed)
    n_vocab = getattr(tokenizer, "vocab_size", getattr(tokenizer, "n_vocab", None))
    vocab_limit = n_vocab if n_vocab is not None and n_vocab < config.vocab_size else None
    streams = [TextStream(tokenizer, stop) for _ in token_lists] if stop or on_text else None
    if session is not None and len(token_lists) != 1:
        raise ValueError(f"a DecodeSession decodes one prompt at a time, got {len(token_lists)}")
    decode = functools.partial(generate_tokens, params, config) if session is None else session.generate_tokens
    out = decode(tokens, mask, key, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 eos_id=eos_id, vocab_limit=vocab_limit, repetition_penalty=repetition_penalty,
                 on_token=None if streams is None else text_sink(streams, eos_id, on_text))
    if streams is not None:
        for row, stream in enumerate(streams):
            rest = stream.finish()
            if rest and on_text is not None:
                on_text(row, rest)
        return [stream.text for stream in streams]
    new_tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    texts = []
    for row, length in zip(new_tokens, lengths):
        ids = row[:length].tolist()
        if eos_id is not None and ids and ids[-1] in eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts
