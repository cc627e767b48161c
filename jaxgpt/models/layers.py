"""What every family's module shares: dense layers and their initialisers, the attention call
(masks, KV cache, kernel choice), the trunk's block loop (with remat) and the task heads.

A family module (`jaxgpt.models.gpt2`, `llama`, ...) defines its blocks and a subclass of
`LanguageModel` that embeds tokens and runs them; everything here is family-independent.

The KV cache (`jaxgpt.models.kv_cache`) is a plain pytree passed in and returned, not a
mutable collection, so decoding is an ordinary pure function that `jit`, `lax.scan` and
`lax.while_loop` can carry.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.models.attention import (blockwise_attention, choose_attention, fused_attention, one_query_attention,
                                     reference_attention)
from jaxgpt.models.kv_cache import Cache
from jaxgpt.models.lora import LoRAConfig, LoRADense
from jaxgpt.models.matmuls import cpu_bf16_dot_general, dense_dot_general, decode_tied_head, is_cpu_bf16
from jaxgpt.models.recompute import recompute_after_cotangent

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Top-level parameters of the task heads, jaxgpt's own names in every family: a classifier or
# reward model's `score` (replaces the LM head) and PPO's `value_head` (beside it).
HEAD_PARAMS = ("score", "value_head")


def compute_dtype(config):
    return DTYPES[config.dtype]


def param_dtype(config):
    """How the model's weights are stored (`model.param_dtype`); LoRA adapters and the value
    head are always float32."""
    return DTYPES[config.param_dtype]


# ---------------------------------------------------------------------------------------
# Dense layers


def _uniform(bound: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def dense_inits(config, fan_in: int, std: float) -> dict:
    """Kernel and bias initialisers of a dense layer with `fan_in` inputs.

    `gpt2` (the default): kernel N(0, std), bias 0, as GPT-2 (std 0.02, residual
    projections 0.02 / sqrt(2 * n_layer)). `torch-default`: PyTorch's `nn.Linear` default
    (kaiming-uniform with a = sqrt(5)), kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    what the book's `GPTModel` starts from.
    """
    if config.init == "torch-default":
        bound = 1.0 / math.sqrt(fan_in)
        return {"kernel_init": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                "bias_init": _uniform(bound)}
    return {"kernel_init": nn.initializers.normal(std)}


@jax.custom_vjp
def take_rows(table, ids):
    """`jnp.take(table, ids, axis=0)` for a 16-bit float table, gathered as uint16: XLA:CPU
    gathers bf16 in float32, converting the whole table first (in a decode loop it keeps the
    float32 copy: llama-3.2-1b's 1 GiB with `model.param_dtype=bfloat16`; XLA makes a uint16
    view of the table once, half that). The gradient is `jnp.take`'s."""
    bits = jax.lax.bitcast_convert_type(table, jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.take(bits, ids, axis=0), table.dtype)


def _take_rows_fwd(table, ids):
    return take_rows(table, ids), (table, ids)


def _take_rows_bwd(res, g):
    table, ids = res
    return jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)[1](g)[0], None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


class Embed(nn.Embed):
    """`nn.Embed` that looks rows up in the stored table and casts the rows, not the table, to
    the compute dtype. Same values; but `nn.Embed` converts the whole `[vocab, d]` table first,
    and for bf16 XLA:CPU gathers in float32, so a bf16 decode loop held a float32 copy of the
    bf16-rounded table (gemma-3-1b: 1.2 GiB). A 16-bit table (`model.param_dtype`) is gathered
    by `take_rows`. The gradient reaches a float32 table as a float32 scatter-add of the rows'."""

    def __call__(self, inputs):
        table = self.embedding
        rows = take_rows(table, inputs) if jnp.dtype(table.dtype).itemsize == 2 else jnp.take(table, inputs, axis=0)
        return rows.astype(self.dtype or table.dtype)


def embedding_init(config, std: float):
    """GPT-2: N(0, std) (wte 0.02, wpe 0.01); torch-default: `nn.Embedding`'s N(0, 1)."""
    return nn.initializers.normal(1.0 if config.init == "torch-default" else std)


def dense(features: int, name: str, *, config, fan_in: int, use_bias=True, std=0.02,
          lora: LoRAConfig | None = None, fused: int = 1):
    """Every dense layer of a model. With `lora`, targeted layers get adapters
    (`jaxgpt.models.lora.LoRADense`; same kernel/bias leaves and math as `nn.Dense`).
    `fan_in` is the input width (for `model.init=torch-default`); `fused`: how many equal
    output blocks the kernel concatenates (GPT-2's q|k|v), for LoRA's `split_qkv`."""
    kwargs = dict(use_bias=use_bias, dtype=compute_dtype(config), param_dtype=param_dtype(config),
                  name=name, **dense_inits(config, fan_in, std))
    kwargs["dot_general"] = cpu_bf16_dot_general if is_cpu_bf16(kwargs["dtype"]) else dense_dot_general
    if lora is None:
        return nn.Dense(features, **kwargs)
    return LoRADense(features, lora=lora, fused=fused, **kwargs)


# ---------------------------------------------------------------------------------------
# Attention


def attention_inputs(tokens, positions=None, attention_mask=None, cache: Cache | None = None):
    """What every block's attention needs, built once per call of the trunk.

    tokens: `[batch, seq]`; attention_mask: `[batch, seq]` (False on padding, which no query
    may attend to); positions: `[batch, seq]` (default 0.. or, with a cache, counted on from
    the cache index). Returns a dict: `mask [batch, 1, seq, kv_len]` bool, `is_causal` (the
    plain causal mask: fused kernels take it implicitly), `positions`, `start` (the cache
    index, 0 without one) and `key_valid [batch, kv_len]` (the cache's new `valid`)."""
    b, t = tokens.shape
    # The fused kernels take the cheaper implicit causal mask when nothing else masks.
    is_causal = cache is None and attention_mask is None
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if cache is None:
        start = 0
        q_slots = jnp.arange(t)
        key_valid = attention_mask  # [b, t]
        k_slots = q_slots
    else:
        start = cache["index"]
        max_len = cache["valid"].shape[1]
        q_slots = start + jnp.arange(t)
        key_valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask, (0, start))
        k_slots = jnp.arange(max_len)
    if positions is None:
        positions = jnp.broadcast_to(q_slots[None, :], (b, t))
    causal = k_slots[None, :] <= q_slots[:, None]  # [q, kv]
    mask = causal[None, None, :, :] & key_valid[:, None, None, :]  # [b, 1, q, kv]
    # Every query may see its own slot, so a padding query never has an all-masked row
    # (fused kernels can return NaN there, which would leak through 0 * NaN). Real
    # tokens' rows are unchanged: they already see themselves.
    mask = mask | (k_slots[None, :] == q_slots[:, None])[None, None]
    return {"mask": mask, "is_causal": is_causal, "positions": positions, "start": start, "key_valid": key_valid,
            "q_slots": q_slots, "k_slots": k_slots}


def sliding_window_mask(att, window: int):
    """The mask `[batch, 1, q, kv_len]` of a sliding-window layer (Gemma 3's local layers):
    `att`'s where the query's slot is less than `window` slots past the key's, so each query
    sees itself and the `window - 1` slots before it (transformers' `sliding_window_causal_mask`;
    slots, not positions, as there). `att`'s own when no key lies that far back. Where
    `att["is_causal"]` holds, the fused kernels generate the same from `attend(..., window=)`."""
    q_slots, k_slots = att["q_slots"], att["k_slots"]
    if k_slots.shape[0] <= window:
        return att["mask"]
    near = (q_slots[:, None] - k_slots[None, :]) < window  # [q, kv]
    return att["mask"] & near[None, None]


def attend(module: nn.Module, config, q, k, v, mask, is_causal: bool, deterministic: bool, window: int = 0):
    """Softmax attention of q `[b, t, heads, hd]` over k/v `[b, kv_len, kv_heads, hd]` by the
    kernel `model.attention` picks for this call (`choose_attention`); `[b, t, heads, hd]`.

    `window` > 0: a sliding-window layer, whose `mask` has the window in it
    (`sliding_window_mask`); with `is_causal` the fused and blockwise kernels, which do not read
    the mask then, generate it (blockwise skips the key tiles outside it).

    With as many keys as queries the keys are the queries' own slots (no cache, or a prefill
    that fills one from slot 0), so `attention_inputs`' mask hides every later key: blockwise
    then reads the mask and also skips the tiles above the diagonal and outside the window.

    The fused kernels have no dropout on attention weights: with dropout, `xla`/`cudnn` run
    `reference` and `auto` a kernel that has it, so the regulariser is never silently dropped.
    `module` draws the dropout key (its `dropout` stream)."""
    attn_dropout = 0.0 if deterministic else config.dropout
    causal_mask = not is_causal and q.shape[1] == k.shape[1]
    kind = choose_attention(config.attention, dtype=q.dtype, dropout=attn_dropout, kv_len=k.shape[1],
                            is_causal=is_causal, head_dim=config.head_dim, q_len=q.shape[1], causal_mask=causal_mask)
    rng = module.make_rng("dropout") if attn_dropout > 0.0 else None
    if kind == "reference":
        return reference_attention(q, k, v, mask, dropout_rate=attn_dropout, dropout_rng=rng)
    if kind == "one_query":
        return one_query_attention(q, k, v, mask)
    if kind == "blockwise":  # causal: the mask is generated per tile, not read
        causal = is_causal or causal_mask
        return blockwise_attention(q, k, v, None if is_causal else mask, is_causal=causal,
                                   dropout_rate=attn_dropout, dropout_rng=rng, window=window if causal else 0)
    return fused_attention(q, k, v, mask, implementation=kind, is_causal=is_causal, window=window)


# ---------------------------------------------------------------------------------------
# The model: a trunk and its heads


class LanguageModel(nn.Module):
    """The part of every family's model that is not the family's: heads and the block loop.

    A family subclasses it with `setup` (its embeddings, `self.blocks`, final norm, and
    `self.setup_heads()`), `hidden_states` and `token_embedding` (the module a tied head
    reads). Blocks are called `block(x, mask, is_causal, deterministic, cache_layer,
    cache_index, rope)` (`mask`, `is_causal` from `attention_inputs`; `rope`: the family's
    rotary tables or None) and return `(x, new_cache_layer)`.

    `apply(params, tokens)` -> the output head on every position, float32: LM logits
    `[batch, seq, vocab]`, or with `num_classes > 0` class logits `[batch, seq, num_classes]`.
    `apply(params, tokens, cache=cache)` -> `(out, new_cache)` for incremental decoding.
    `return_hidden=True` returns the final-norm hidden states `[batch, seq, n_embd]`
    instead. `last_only=True` applies the head to the last position only (`[batch, 1, ...]`:
    decoding never needs the prompt's logits). `head_positions` (`[batch, k]` int) applies it
    at those positions only (`[batch, k, ...]`): preference and RL losses score response
    tokens, and the prompt's `[batch, seq, vocab]` logits would dominate their cost.

    The heads are methods on hidden states `[..., n_embd]`, for callers that run the trunk
    once and read several heads (PPO: log-probs and values from one pass), e.g.
    `model.apply({"params": p}, hidden, method="values")`:

        lm_logits     [..., vocab]        the tied token embedding (`nn.Embed.attend`) or `lm_head/kernel`
        class_logits  [..., num_classes]  `score/kernel [n_embd, num_classes]`, no bias (Hugging
                                          Face's *ForSequenceClassification); num_classes 1 is
                                          a reward model's scalar score
        values        [...]               `value_head/{kernel [n_embd, 1], bias [1]}`, zero-
                                          initialised: PPO's critic on the policy's trunk

    Optional attributes (all off by default, leaving the LM exactly as the family defines
    it): `num_classes` replaces the LM head by the classifier `score`; `value_head` adds the
    value head; `lora` (a `jaxgpt.models.lora.LoRAConfig`) adds low-rank adapters to the
    targeted dense layers.
    """

    config: Any
    num_classes: int = 0
    value_head: bool = False
    lora: LoRAConfig | None = None

    def setup_heads(self):
        cfg = self.config
        if self.num_classes:
            self.score = dense(self.num_classes, "score", config=cfg, fan_in=cfg.n_embd, use_bias=False,
                               lora=self.lora)
        elif not cfg.tie_embeddings:
            self.lm_head = dense(cfg.vocab_size, "lm_head", config=cfg, fan_in=cfg.n_embd, use_bias=False)
        if self.value_head:
            self.critic = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32, name="value_head",
                                   kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)

    def block_class(self, block_cls):
        """`block_cls`, wrapped in `nn.remat` for `model.remat` with a policy other than
        `nothing_saveable` (that one runs through `_recomputed_block`)."""
        cfg = self.config
        if cfg.remat and cfg.remat_policy != "nothing_saveable":
            # is_causal and deterministic are Python flags: static under jax.checkpoint
            return nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                            static_argnums=(3, 4))
        return block_cls

    def __call__(self, tokens, *, positions=None, attention_mask=None, cache: Cache | None = None,
                 deterministic: bool = True, return_hidden: bool = False, last_only: bool = False,
                 head_positions=None):
        x, new_cache = self.hidden_states(tokens, positions=positions, attention_mask=attention_mask,
                                          cache=cache, deterministic=deterministic)
        if last_only:
            x = x[:, -1:]
        if head_positions is not None:  # [b, k]: the head only where it is needed (e.g. responses)
            x = jnp.take_along_axis(x, jnp.asarray(head_positions, jnp.int32)[..., None], axis=1)
        if return_hidden:
            out = x
        elif self.num_classes:
            out = self.class_logits(x)
        else:
            out = self.lm_logits(x)
        if self.value_head and self.is_initializing():  # a head no default output reads: create it
            self.values(x)
        return out if cache is None else (out, new_cache)

    def run_blocks(self, x, att, deterministic: bool, cache: Cache | None, rope=None, per_layer=None):
        """`x [b, t, n_embd]` through `self.blocks` (each with its cache layer); returns `x` and
        the new cache (None without one). `per_layer(i) -> (mask, is_causal, rope)` gives layers
        their own masks and rotary tables (Gemma 3's sliding-window layers); by default every
        layer takes `att`'s and `rope`."""
        new_layers = []
        recompute = (self.config.remat and self.config.remat_policy == "nothing_saveable" and cache is None
                     and not self.is_initializing())
        per_layer = per_layer or (lambda i: (att["mask"], att["is_causal"], rope))
        for i, block in enumerate(self.blocks):
            mask, is_causal, layer_rope = per_layer(i)
            if recompute:
                x = self._recomputed_block(block, x, mask, is_causal, deterministic, layer_rope)
                new_layers.append(None)
                continue
            layer_cache = None if cache is None else cache["layers"][i]
            x, new_layer = block(x, mask, is_causal, deterministic, layer_cache,
                                 None if cache is None else att["start"], layer_rope)
            new_layers.append(new_layer)
        if cache is None:
            return x, None
        return x, {"layers": tuple(new_layers), "valid": att["key_valid"], "index": att["start"] + x.shape[1]}

    def _recomputed_block(self, block, x, mask, is_causal, deterministic, rope):
        """`block` on `x [batch, seq, n_embd]`, its activations recomputed in the backward
        pass (`model.remat` with `nothing_saveable`): only the block's input is kept.

        Not `jax.checkpoint`: XLA:CPU expands checkpoint's optimization barriers and CSE then
        merges the recomputation back into the forward pass, so nothing is saved there
        (BENCHMARKS.md). `recompute_after_cotangent` orders the recomputation after the
        incoming gradient by a data dependency, which every backend keeps. Dropout masks come
        from the block's own stream: other draws than without remat, the same distribution."""
        params = block.variables["params"]
        rng = None if deterministic or self.config.dropout == 0.0 else block.make_rng("dropout")
        detached = block.clone(parent=None, name=None)  # unbound: a pure function of p

        def run(p, x, mask, rope, rng):
            rngs = None if rng is None else {"dropout": rng}
            return detached.apply({"params": p}, x, mask, is_causal, deterministic, None, None, rope, rngs=rngs)[0]

        return recompute_after_cotangent(run)(params, x, mask, rope, rng)

    def token_embedding(self) -> nn.Embed:
        raise NotImplementedError

    def hidden_states(self, tokens, *, positions=None, attention_mask=None, cache=None, deterministic=True):
        raise NotImplementedError

    def lm_logits(self, hidden):
        """The LM head: `[..., n_embd]` -> float32 `[..., vocab]`."""
        if not self.config.tie_embeddings:
            return self.lm_head(hidden).astype(jnp.float32)
        embedding = self.token_embedding()
        if hidden.ndim == 3 and hidden.shape[1] == 1 and is_cpu_bf16(compute_dtype(self.config)):  # decoding
            return decode_tied_head(hidden, embedding.embedding)
        return embedding.attend(hidden).astype(jnp.float32)

    def class_logits(self, hidden):
        """The classifier / scalar score head: `[..., n_embd]` -> float32 `[..., num_classes]`."""
        return self.score(hidden).astype(jnp.float32)

    def values(self, hidden):
        """The value head: `[..., n_embd]` -> float32 `[...]`."""
        return self.critic(hidden.astype(jnp.float32))[..., 0]
