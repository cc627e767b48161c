"""Llama 3 / 3.1 / 3.2 (`model.family: llama`): RMSNorm, rotary positions (with Llama 3's
frequency scaling), a SwiGLU MLP, grouped-query attention, no biases, tied or untied head.

Parameter tree (Hugging Face's names, so loading weights is a rename; dense kernels `[in, out]`,
HF's `nn.Linear` weights `[out, in]` transposed):

    embed_tokens/embedding [vocab, d]           model.embed_tokens.weight
    layers_{i}/input_layernorm/scale [d]        model.layers.{i}.input_layernorm.weight
    layers_{i}/self_attn/q_proj/kernel [d, h * hd]     ...self_attn.q_proj.weight
    layers_{i}/self_attn/k_proj|v_proj/kernel [d, kv * hd]
    layers_{i}/self_attn/o_proj/kernel [h * hd, d]
    layers_{i}/post_attention_layernorm/scale [d]
    layers_{i}/mlp/gate_proj|up_proj/kernel [d, m]     layers_{i}/mlp/down_proj/kernel [m, d]
    norm/scale [d]                              model.norm.weight
    lm_head/kernel [d, vocab]                   lm_head.weight   (only when not tied)

plus the task heads (`score`, `value_head`) and LoRA adapters as every family has them.
`jaxgpt.models.qwen3` is this family with RMSNorm on each head's q and k.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.errors import UserError
from jaxgpt.models.family import Family, Target, hf_shape
from jaxgpt.models.kv_cache import is_ring, window_keys, write_cache, write_ring_cache
from jaxgpt.models.layers import Embed, LanguageModel, attend, attention_inputs, compute_dtype, dense, embedding_init, param_dtype
from jaxgpt.models.lora import LoRAConfig
from jaxgpt.models.recompute import RMSNorm
from jaxgpt.models.rope import apply_rope, rope_tables


class LlamaAttention(nn.Module):
    """Grouped-query self-attention: `kv_heads` key/value heads serve `n_head` query heads,
    rotary positions on q and k (after Qwen3's per-head norms when `qk_norm`; Gemma 3's norms
    weigh by `1 + scale`, `norm_offset`). Scores are scaled by `model.query_pre_attn_scalar`
    ** -1/2 where it is set (Gemma 3), else head_dim ** -1/2. `window` > 0: a sliding-window
    layer (its mask holds the window; `layers.attend`)."""

    config: Any
    lora: LoRAConfig | None = None
    qk_norm: bool = False
    norm_offset: bool = False
    window: int = 0

    @nn.compact
    def __call__(self, x, mask, is_causal, deterministic, cache_layer, cache_index, rope):
        cfg = self.config
        b, t, d = x.shape
        h, kv, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        proj = lambda n, name: dense(n * hd, name, config=cfg, fan_in=d, use_bias=False, lora=self.lora)  # noqa: E731
        q = proj(h, "q_proj")(x).reshape(b, t, h, hd)
        k = proj(kv, "k_proj")(x).reshape(b, t, kv, hd)
        v = proj(kv, "v_proj")(x).reshape(b, t, kv, hd)
        if self.qk_norm:
            norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, dtype=q.dtype, param_dtype=param_dtype(cfg),  # noqa: E731
                                        unit_offset=self.norm_offset, name=name)
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cfg.query_pre_attn_scalar and cfg.query_pre_attn_scalar != hd:  # the kernels scale by hd ** -1/2
            q = q * jnp.asarray((hd / cfg.query_pre_attn_scalar) ** 0.5, q.dtype)
        new_cache = None
        if cache_layer is not None:  # a sliding-window layer's cache may be a ring (its mask says where)
            ring = is_ring(cache_layer, self.window)
            k, v, new_cache = (write_ring_cache if ring else write_cache)(cache_layer, k, v, cache_index)
            if self.window and not ring and t == 1 and k.shape[1] > self.window:  # every slot kept: read the window
                k, v, mask = window_keys(k, v, mask, cache_index, self.window)
        y = attend(self, cfg, q, k, v, mask, is_causal, deterministic, self.window).reshape(b, t, h * hd)
        return dense(d, "o_proj", config=cfg, fan_in=h * hd, use_bias=False, lora=self.lora)(y), new_cache


class SwiGLU(nn.Module):
    """`down(act(gate(x)) * up(x))`, hidden width `model.mlp_width`; `act` silu (Llama, Qwen3)
    or GELU's tanh approximation (Gemma 3's GeGLU)."""

    config: Any
    lora: LoRAConfig | None = None
    act: Callable = jax.nn.silu

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        m, d = cfg.mlp_width, x.shape[-1]
        gate = dense(m, "gate_proj", config=cfg, fan_in=d, use_bias=False, lora=self.lora)(x)
        up = dense(m, "up_proj", config=cfg, fan_in=d, use_bias=False, lora=self.lora)(x)
        return dense(d, "down_proj", config=cfg, fan_in=m, use_bias=False, lora=self.lora)(self.act(gate) * up)


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)).
    `model.dropout` drops attention weights only (transformers' `attention_dropout`)."""

    config: Any
    lora: LoRAConfig | None = None
    qk_norm: bool = False

    @nn.compact
    def __call__(self, x, mask, is_causal, deterministic=True, cache_layer=None, cache_index=None, rope=None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg), name=name)  # noqa: E731
        y, new_cache = LlamaAttention(cfg, self.lora, self.qk_norm, name="self_attn")(
            norm("input_layernorm")(x), mask, is_causal, deterministic, cache_layer, cache_index, rope)
        x = x + y
        return x + SwiGLU(cfg, self.lora, name="mlp")(norm("post_attention_layernorm")(x)), new_cache


class Llama(LanguageModel):
    """Token embedding `embed_tokens`, blocks `layers_i`, final RMSNorm `norm`, and the heads of
    `jaxgpt.models.layers.LanguageModel` (the tied head reads `embed_tokens`)."""

    qk_norm = False  # Qwen3 normalises each head's q and k

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.n_embd, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg),
                                     embedding_init=embedding_init(cfg, 0.02))
        block_cls = self.block_class(LlamaBlock)
        self.layers = [block_cls(cfg, self.lora, self.qk_norm) for _ in range(cfg.n_layer)]  # layers_0, ...
        self.norm = RMSNorm(cfg.layer_norm_epsilon, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg))
        self.setup_heads()

    @property
    def blocks(self):
        return self.layers

    def token_embedding(self):
        return self.embed_tokens

    def hidden_states(self, tokens, *, positions=None, attention_mask=None, cache=None, deterministic: bool = True):
        """The trunk: final-norm hidden states `[batch, seq, n_embd]` and the updated cache."""
        att = attention_inputs(tokens, positions, attention_mask, cache)
        x = self.embed_tokens(tokens)
        x, new_cache = self.run_blocks(x, att, deterministic, cache, rope_tables(self.config, att["positions"]))
        return self.norm(x), new_cache


# ---------------------------------------------------------------------------------------
# The family

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj|self_attn\.[qk]_norm|\w+_layernorm)"
                       r"\.(weight|bias)")
_SHAPE_KEYS = {"vocab_size": ("vocab_size",), "context_length": ("max_position_embeddings",),
               "n_embd": ("hidden_size",), "n_layer": ("num_hidden_layers",), "n_head": ("num_attention_heads",),
               "mlp_dim": ("intermediate_size",)}


class LlamaFamily(Family):
    name = "llama"
    title = "Llama"
    module = Llama
    token_embedding = "embed_tokens"
    block_prefix = "layers"
    final_norm = "norm"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    axes_table = (
        ("embed_tokens/embedding", ("vocab", "embed")), ("q_proj/kernel", ("embed", "heads")),
        ("(k|v)_proj/kernel", ("embed", "kv_heads")), ("o_proj/kernel", ("heads", "embed")), ("(gate|up)_proj/kernel", ("embed", "mlp")),
        ("down_proj/kernel", ("mlp", "embed")), ("(q|k)_norm/scale", ("head_dim",)),
        ("lm_head/kernel", ("embed", "vocab")), ("(score|value_head)/kernel", ("embed", None)),
        ("value_head/bias", (None,)), ("scale", ("embed",)),
    )
    hf_model_type = "llama"
    hf_architecture = "LlamaForCausalLM"
    hf_classifier = "LlamaForSequenceClassification"

    def layer_matmul_params(self, config) -> int:
        d, hd = config.n_embd, config.head_dim
        return 2 * d * config.n_head * hd + 2 * d * config.kv_heads * hd + 3 * d * config.mlp_width

    def validate(self, config) -> None:
        super().validate(config)
        if config.qkv_bias:
            raise UserError(f"model.family {self.name} has no attention biases; set model.qkv_bias=false")

    # -- Hugging Face ----------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], where: str = "config.json"):
        """A `ModelConfig` from a config.json dict; options this model does not implement
        (sliding windows, MLP or output biases, another activation or rope scaling) are a
        UserError rather than a model that silently computes something else."""
        from jaxgpt.config import ModelConfig, RopeScaling

        shape = {field: hf_shape(hf, keys, where) for field, keys in _SHAPE_KEYS.items()}
        heads = shape["n_head"]
        kv = hf_shape(hf, ("num_key_value_heads",), where, required=False) or heads
        head_dim = hf_shape(hf, ("head_dim",), where, required=False) or shape["n_embd"] // heads
        if heads % kv:
            raise UserError(f"{where}: num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: hidden_act is {hf.get('hidden_act')!r}; jaxgpt's {self.title} MLP computes silu")
        for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
            if hf.get(key):
                raise UserError(f"{where}: {key}=true is not supported by jaxgpt's {self.title}")
        return ModelConfig(
            family=self.name, **shape, n_kv_head=kv, head_size=head_dim if head_dim * heads != shape["n_embd"] else 0,
            dropout=float(hf.get("attention_dropout") or 0.0), qkv_bias=False,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), **self._rope(hf, where, RopeScaling))

    @staticmethod
    def _rope(hf: Mapping[str, Any], where: str, cls) -> dict:
        """`rope_theta` and `rope_scaling` of a config.json: transformers 4's two keys, or 5's
        `rope_parameters` (which holds both)."""
        params = hf.get("rope_parameters") or {}
        scaling = params if params else (hf.get("rope_scaling") or {})
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return {"rope_theta": theta, "rope_scaling": cls()}
        if kind != "llama3":
            raise UserError(f"{where}: rope scaling {kind!r} is not supported (jaxgpt implements llama3)")
        return {"rope_theta": theta, "rope_scaling": cls(
            type="llama3", factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_context=int(scaling["original_max_position_embeddings"]))}

    def config_to_hf(self, config) -> dict[str, Any]:
        r = config.rope_scaling
        scaling = None if not r.type else {
            "rope_type": r.type, "factor": r.factor, "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor, "original_max_position_embeddings": r.original_context}
        return {
            "architectures": [self.hf_architecture], "model_type": self.hf_model_type, "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd, "intermediate_size": config.mlp_width, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
            "max_position_embeddings": config.context_length, "rms_norm_eps": config.layer_norm_epsilon,
            "rope_theta": config.rope_theta, "rope_scaling": scaling, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": config.dropout, "mlp_bias": False,
            "tie_word_embeddings": config.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
            "dtype": "float32",
        }

    def hf_target(self, key: str) -> Target | None:
        if key == "model.embed_tokens.weight":
            return Target(("embed_tokens", "embedding"))
        if key == "model.norm.weight":
            return Target(("norm", "scale"))
        if key == "lm_head.weight":
            return Target(("lm_head", "kernel"), "T")
        if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", key):
            return Target(None)  # a buffer of older checkpoints
        m = _HF_LAYER.fullmatch(key)
        if m is None:
            return None
        layer, module, kind = m.groups()
        parts = (f"layers_{layer}", *module.split("."))
        if kind == "bias":
            return None  # no family member has biases: an unexpected tensor
        return Target((*parts, "scale")) if module.endswith(("layernorm", "_norm")) else Target((*parts, "kernel"), "T")

    def hf_key(self, path: tuple[str, ...]) -> tuple[str, bool]:
        if path == ("embed_tokens", "embedding"):
            return "model.embed_tokens.weight", False
        if path == ("norm", "scale"):
            return "model.norm.weight", False
        if path == ("lm_head", "kernel"):
            return "lm_head.weight", True
        layer = path[0].removeprefix("layers_")
        return f"model.layers.{layer}.{'.'.join(path[1:-1])}.weight", path[-1] == "kernel"


FAMILY = LlamaFamily()


def num_params_hf(config) -> int:
    """Parameter count by arithmetic, as transformers counts it (a tied head once)."""
    d, V, hd = config.n_embd, config.vocab_size, config.head_dim
    attn = d * config.n_head * hd * 2 + 2 * d * config.kv_heads * hd
    norms = {"llama": 2 * d, "qwen3": 2 * d + 2 * hd, "gemma3": 4 * d + 2 * hd}[config.family]
    block = attn + 3 * d * config.mlp_width + norms
    return V * d * (1 if config.tie_embeddings else 2) + config.n_layer * block + d


__all__ = ["FAMILY", "Llama", "LlamaBlock", "LlamaFamily", "num_params_hf"]
