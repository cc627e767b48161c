"""GPT-2 in Flax linen, with GPT-2's parameter names and an explicit KV cache.

Parameter tree (names follow OpenAI/Hugging Face GPT-2, so loading weights is a rename):

    wte/embedding [vocab, d]      wpe/embedding [context, d]
    h_{i}/ln_1/{scale,bias}       h_{i}/attn/c_attn/{kernel [d, 3d], bias}
    h_{i}/attn/c_proj/{kernel [d, d], bias}
    h_{i}/ln_2/{scale,bias}       h_{i}/mlp/c_fc/{kernel [d, 4d], bias}
    h_{i}/mlp/c_proj/{kernel [4d, d], bias}
    ln_f/{scale,bias}             lm_head/kernel [d, vocab]   (only when not tied)
    score/kernel [d, num_classes]  (a classifier, `num_classes > 0`: replaces the LM head)
    .../lora_a, .../lora_b         (LoRA adapters on targeted dense layers, `jaxgpt.models.lora`)

Dense kernels are `[in, out]`, the same layout as GPT-2's Conv1D weights.

The KV cache is a plain pytree passed in and returned (`init_cache`), not a mutable
collection, so decoding is an ordinary pure function that `jit`, `lax.scan` and
`lax.while_loop` can carry.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.models.attention import (
    blockwise_attention,
    choose_attention,
    fused_attention,
    reference_attention,
)
from jaxgpt.config import ModelConfig
from jaxgpt.models.lora import LoRAConfig, LoRADense
from jaxgpt.models.recompute import LayerNorm, gelu_tanh, recompute_after_cotangent

Array = jax.Array
Cache = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config: ModelConfig):
    return _DTYPES[config.dtype]


def init_cache(config: ModelConfig, batch_size: int, max_len: int | None = None) -> Cache:
    """An empty KV cache for `batch_size` rows and `max_len` slots (default: the context).

    `layers[i]["k"|"v"]`: `[batch, max_len, n_head, head_dim]` in the compute dtype;
    `valid`: `[batch, max_len]` bool, True where a slot holds a real (non-padding) token;
    `index`: int32 scalar, the next slot to write (shared by all rows: prompts are
    left-padded so they end together).
    """
    max_len = max_len or config.context_length
    shape = (batch_size, max_len, config.n_head, config.head_dim)
    dtype = compute_dtype(config)
    layers = tuple(
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layer)
    )
    return {
        "layers": layers,
        "valid": jnp.zeros((batch_size, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def _uniform(bound: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense_inits(config: ModelConfig, fan_in: int, std: float) -> dict:
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


def _embedding_init(config: ModelConfig, std: float):
    """GPT-2: N(0, std) (wte 0.02, wpe 0.01); torch-default: `nn.Embedding`'s N(0, 1)."""
    return nn.initializers.normal(1.0 if config.init == "torch-default" else std)


def _dense(features: int, name: str, *, config: ModelConfig, fan_in: int, use_bias=True, std=0.02,
           lora: LoRAConfig | None = None, fused: int = 1):
    """Every dense layer of the model. With `lora`, targeted layers get adapters
    (`jaxgpt.models.lora.LoRADense`; same kernel/bias leaves and math as `nn.Dense`).
    `fan_in` is the input width (for `model.init=torch-default`)."""
    kwargs = dict(use_bias=use_bias, dtype=compute_dtype(config), param_dtype=jnp.float32,
                  name=name, **_dense_inits(config, fan_in, std))
    if lora is None:
        return nn.Dense(features, **kwargs)
    return LoRADense(features, lora=lora, fused=fused, **kwargs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection (`c_attn`)."""

    config: ModelConfig
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x, mask, is_causal, deterministic=True, cache_layer=None, cache_index=None):
        """x: `[batch, seq, n_embd]`; mask: `[batch, 1, seq, kv_len]` bool.

        With a cache layer, this call's keys and values are written at `cache_index` and the
        query attends over the whole cache (`kv_len = max_len`).
        """
        cfg = self.config
        b, t, _ = x.shape
        qkv = _dense(3 * cfg.n_embd, "c_attn", config=cfg, fan_in=cfg.n_embd, use_bias=cfg.qkv_bias, lora=self.lora, fused=3)(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (a.reshape(b, t, cfg.n_head, cfg.head_dim) for a in (q, k, v))  # [b, t, h, hd]
        new_cache = None
        if cache_layer is not None:
            k = jax.lax.dynamic_update_slice(cache_layer["k"], k.astype(cache_layer["k"].dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_layer["v"], v.astype(cache_layer["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": k, "v": v}
        attn_dropout = 0.0 if deterministic else cfg.dropout
        # The fused kernels have no dropout on attention weights: with dropout, `xla`/`cudnn`
        # run `reference` and `auto` a kernel that has it (`jaxgpt.models.attention.choose_attention`),
        # so the regulariser is never silently dropped.
        kind = choose_attention(cfg.attention, dtype=q.dtype, dropout=attn_dropout, kv_len=k.shape[1],
                                is_causal=is_causal, head_dim=cfg.head_dim)
        rng = self.make_rng("dropout") if attn_dropout > 0.0 else None
        if kind == "reference":
            y = reference_attention(q, k, v, mask, dropout_rate=attn_dropout, dropout_rng=rng)
        elif kind == "blockwise":  # causal: the mask is generated per tile, not read
            y = blockwise_attention(q, k, v, None if is_causal else mask, is_causal=is_causal,
                                    dropout_rate=attn_dropout, dropout_rng=rng)
        else:
            y = fused_attention(q, k, v, mask, implementation=kind, is_causal=is_causal)
        y = y.reshape(b, t, cfg.n_embd)
        y = _dense(cfg.n_embd, "c_proj", config=cfg, fan_in=cfg.n_embd, std=0.02 / math.sqrt(2 * cfg.n_layer),
                   lora=self.lora)(y)
        return y, new_cache


class MLP(nn.Module):
    config: ModelConfig
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = _dense(4 * cfg.n_embd, "c_fc", config=cfg, fan_in=cfg.n_embd, lora=self.lora)(x)
        h = gelu_tanh(h)  # GPT-2's "gelu_new"; keeps only h for the backward pass
        return _dense(cfg.n_embd, "c_proj", config=cfg, fan_in=4 * cfg.n_embd, std=0.02 / math.sqrt(2 * cfg.n_layer),
                      lora=self.lora)(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: ModelConfig
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x, mask, is_causal, deterministic=True, cache_layer=None, cache_index=None):
        cfg = self.config
        ln = lambda name: LayerNorm(cfg.layer_norm_epsilon, dtype=compute_dtype(cfg), name=name)
        drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
        y, new_cache = CausalSelfAttention(cfg, self.lora, name="attn")(
            ln("ln_1")(x), mask, is_causal, deterministic, cache_layer, cache_index
        )
        x = x + drop(y)
        x = x + drop(MLP(cfg, self.lora, name="mlp")(ln("ln_2")(x)))
        return x, new_cache


class GPT(nn.Module):
    """GPT-2: a trunk (embeddings, blocks, final LayerNorm) and its heads, each defined once.

    `apply(params, tokens)` -> the output head on every position, float32: LM logits
    `[batch, seq, vocab]`, or with `num_classes > 0` class logits `[batch, seq, num_classes]`.
    `apply(params, tokens, cache=cache)` -> `(out, new_cache)` for incremental decoding.
    `return_hidden=True` returns the final-LayerNorm hidden states `[batch, seq, n_embd]`
    instead. `last_only=True` applies the head to the last position only (`[batch, 1, ...]`:
    decoding never needs the prompt's logits). `head_positions` (`[batch, k]` int) applies it
    at those positions only (`[batch, k, ...]`): preference and RL losses score response
    tokens, and the prompt's `[batch, seq, vocab]` logits would dominate their cost.

    The heads are methods on hidden states `[..., n_embd]`, for callers that run the trunk
    once and read several heads (PPO: log-probs and values from one pass), e.g.
    `model.apply({"params": p}, hidden, method=GPT.lm_logits)`:

        lm_logits     [..., vocab]        the tied `wte` (`nn.Embed.attend`) or `lm_head/kernel`
        class_logits  [..., num_classes]  `score/kernel [n_embd, num_classes]`, no bias (Hugging
                                          Face's GPT2ForSequenceClassification); num_classes 1 is
                                          a reward model's scalar score
        values        [...]               `value_head/{kernel [n_embd, 1], bias [1]}`, zero-
                                          initialised: PPO's critic on the policy's trunk

    tokens: `[batch, seq]` int. positions: `[batch, seq]` (default: 0.. or, with a cache,
    counted on from the cache index). attention_mask: `[batch, seq]` bool, False on padding
    tokens, which no query may attend to.

    Optional attributes (all off by default, leaving the LM exactly as above): `num_classes`
    replaces the LM head by the classifier `score`; `value_head` adds the value head; `lora`
    (a `jaxgpt.models.lora.LoRAConfig`) adds low-rank adapters to the targeted dense layers.
    """

    config: ModelConfig
    num_classes: int = 0
    value_head: bool = False
    lora: LoRAConfig | None = None

    def setup(self):
        cfg = self.config
        dtype = compute_dtype(cfg)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, param_dtype=jnp.float32,
                            embedding_init=_embedding_init(cfg, 0.02))
        self.wpe = nn.Embed(cfg.context_length, cfg.n_embd, dtype=dtype, param_dtype=jnp.float32,
                            embedding_init=_embedding_init(cfg, 0.01))
        block_cls = Block
        if cfg.remat and cfg.remat_policy != "nothing_saveable":  # nothing_saveable: `_recomputed_block`
            # is_causal and deterministic are Python flags: static under jax.checkpoint
            block_cls = nn.remat(Block, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                                 static_argnums=(3, 4))
        self.h = [block_cls(cfg, self.lora) for _ in range(cfg.n_layer)]  # named h_0, h_1, ...
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, dtype=dtype)
        # Named as the inline module it used to be, so its dropout masks (derived from the
        # module path) stay what they were.
        self.embed_dropout = nn.Dropout(cfg.dropout, name="Dropout_0")
        if self.num_classes:
            self.score = _dense(self.num_classes, "score", config=cfg, fan_in=cfg.n_embd, use_bias=False,
                                lora=self.lora)
        elif not cfg.tie_embeddings:
            self.lm_head = _dense(cfg.vocab_size, "lm_head", config=cfg, fan_in=cfg.n_embd, use_bias=False)
        if self.value_head:
            self.critic = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32, name="value_head",
                                   kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)

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

    def hidden_states(self, tokens, *, positions=None, attention_mask=None, cache: Cache | None = None,
                      deterministic: bool = True):
        """The trunk: final-LayerNorm hidden states `[batch, seq, n_embd]` (compute dtype) and
        the updated cache (None without one)."""
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

        x = self.wte(tokens) + self.wpe(positions)
        x = self.embed_dropout(x, deterministic=deterministic)
        new_layers = []
        recompute = (self.config.remat and self.config.remat_policy == "nothing_saveable" and cache is None
                     and not self.is_initializing())
        for i, block in enumerate(self.h):
            if recompute:
                x, new_layer = self._recomputed_block(i, x, mask, is_causal, deterministic), None
                new_layers.append(new_layer)
                continue
            layer_cache = None if cache is None else cache["layers"][i]
            x, new_layer = block(x, mask, is_causal, deterministic, layer_cache,
                                 start if cache is not None else None)
            new_layers.append(new_layer)
        x = self.ln_f(x)
        new_cache = None if cache is None else {"layers": tuple(new_layers), "valid": key_valid, "index": start + t}
        return x, new_cache

    def _recomputed_block(self, i, x, mask, is_causal, deterministic):
        """Block `h_i` on `x [batch, seq, n_embd]`, its activations recomputed in the backward
        pass (`model.remat` with `nothing_saveable`): only the block's input is kept.

        Not `jax.checkpoint`: XLA:CPU expands checkpoint's optimization barriers and CSE then
        merges the recomputation back into the forward pass, so nothing is saved there
        (BENCHMARKS.md). `recompute_after_cotangent` orders the recomputation after the
        incoming gradient by a data dependency, which every backend keeps. Dropout masks come
        from the block's own stream: other draws than without remat, the same distribution."""
        block = self.h[i]
        params = block.variables["params"]
        rng = None if deterministic or self.config.dropout == 0.0 else block.make_rng("dropout")
        detached = Block(self.config, self.lora, parent=None)  # unbound: a pure function of p

        def run(p, x, mask, rng):
            rngs = None if rng is None else {"dropout": rng}
            return detached.apply({"params": p}, x, mask, is_causal, deterministic, rngs=rngs)[0]

        return recompute_after_cotangent(run)(params, x, mask, rng)

    def lm_logits(self, hidden):
        """The LM head: `[..., n_embd]` -> float32 `[..., vocab]`."""
        out = self.wte.attend(hidden) if self.config.tie_embeddings else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def class_logits(self, hidden):
        """The classifier / scalar score head: `[..., n_embd]` -> float32 `[..., num_classes]`."""
        return self.score(hidden).astype(jnp.float32)

    def values(self, hidden):
        """The value head: `[..., n_embd]` -> float32 `[...]`."""
        return self.critic(hidden.astype(jnp.float32))[..., 0]


def init_params(config: ModelConfig, key: Array, seq_len: int = 8, **attrs):
    """Float32 params for `config` (a plain dict pytree, no `{"params": ...}` wrapper).
    `attrs`: optional `GPT` attributes (`num_classes`, `lora`)."""
    model = GPT(config, **attrs)
    tokens = jnp.zeros((1, min(seq_len, config.context_length)), jnp.int32)
    return model.init({"params": key}, tokens)["params"]


def param_shapes(config: ModelConfig, **attrs):
    """Parameter shapes without allocating (for presets and weight-loading checks)."""
    model = GPT(config, **attrs)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init({"params": jax.random.key(0)}, t), tokens)
    return shapes["params"]


def count_params(params) -> int:
    return sum(int(math.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def lm_head_kernel(config: ModelConfig, params) -> Array:
    """The LM head's kernel `[n_embd, vocab]` float32 (`GPT.lm_logits` is `hidden @ it`): the
    tied `wte/embedding` transposed, or `lm_head/kernel`. For the fused head + loss
    (`jaxgpt.train.losses.head_cross_entropy`, `head_logprobs`), which never forms the logits."""
    return params["wte"]["embedding"].T if config.tie_embeddings else params["lm_head"]["kernel"]
