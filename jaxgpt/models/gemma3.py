"""Gemma 3, text (`model.family: gemma3`; transformers' `Gemma3ForCausalLM`, the 270M and 1B
checkpoints, and the language model of the multimodal 4B-27B ones, `Gemma3ForConditionalGeneration`,
whose image side is not read): Llama's grouped-query attention and gated MLP (`jaxgpt.models.llama`) with

- sliding-window layers: every `sliding_window_pattern`-th layer (6th) attends to the whole
  context, the others to their last `sliding_window` slots (512), with their own rotary base
  `rope_local_theta` (10,000; the global layers' `rope_theta`, 1,000,000, and its scaling);
- RMSNorm that weighs by `1 + scale` (zeros at init), in float32, before and after each of
  attention and the MLP (four per block), and on each head's q and k (as Qwen3);
- a GeGLU MLP (GELU's tanh approximation), token embeddings times sqrt(n_embd), scores scaled
  by `query_pre_attn_scalar ** -1/2` and a tied head.

Parameter tree: Llama's names plus `layers_{i}/pre_feedforward_layernorm/scale [d]` and
`.../post_feedforward_layernorm/scale [d]` (HF `model.layers.{i}.pre_feedforward_layernorm.weight`,
...), and Qwen3's `self_attn/q_norm|k_norm/scale [head_dim]`. A norm's `scale` is HF's `weight`
as stored (the `1 +` is in the arithmetic), so loading stays a rename.

A sliding-window layer's KV cache is a ring of its last `sliding_window` slots
(`jaxgpt.models.kv_cache.write_ring_cache`): at 32k slots, gemma-3-1b's cache is 1/6 the size
of one holding every slot in every layer, and a decode step reads 1/6 the keys. (A chat's
`DecodeSession` keeps every slot, since a ring cannot be cut back, and a decode step reads
the window's; `kv_cache.is_ring`, `kv_cache.window_keys`.)
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jaxgpt.errors import UserError
from jaxgpt.models.family import Target, hf_shape
from jaxgpt.models.kv_cache import init_cache, is_ring, ring_window_mask
from jaxgpt.models.layers import Embed, attention_inputs, compute_dtype, embedding_init, param_dtype, sliding_window_mask
from jaxgpt.models.llama import Llama, LlamaAttention, LlamaFamily, SwiGLU
from jaxgpt.models.lora import LoRAConfig
from jaxgpt.models.recompute import RMSNorm, gelu_tanh
from jaxgpt.models.rope import rope_tables


def is_sliding(config, i: int) -> bool:
    """Whether layer `i` attends within `model.sliding_window` (transformers' `layer_types`:
    sliding unless `(i + 1) % sliding_window_pattern == 0`)."""
    return bool(config.sliding_window) and (i + 1) % config.sliding_window_pattern != 0


class Gemma3Block(nn.Module):
    """x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))); `sliding`: the layer
    attends within `model.sliding_window` (its mask says so; the kernels may generate it)."""

    config: Any
    lora: LoRAConfig | None = None
    sliding: bool = False

    @nn.compact
    def __call__(self, x, mask, is_causal, deterministic=True, cache_layer=None, cache_index=None, rope=None):
        cfg = self.config
        def norm(name):
            return RMSNorm(cfg.layer_norm_epsilon, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg),
                           unit_offset=True, name=name)

        window = cfg.sliding_window if self.sliding else 0
        y, new_cache = LlamaAttention(cfg, self.lora, qk_norm=True, norm_offset=True, window=window, name="self_attn")(
            norm("input_layernorm")(x), mask, is_causal, deterministic, cache_layer, cache_index, rope)
        x = x + norm("post_attention_layernorm")(y)
        y = SwiGLU(cfg, self.lora, act=gelu_tanh, name="mlp")(norm("pre_feedforward_layernorm")(x))
        return x + norm("post_feedforward_layernorm")(y), new_cache


class Gemma3(Llama):
    """Llama's module with Gemma's blocks and norm: token embedding `embed_tokens` (times
    sqrt(n_embd) on the way in; the tied head reads it unscaled), blocks `layers_i`, final norm
    `norm`, and `LanguageModel`'s heads."""

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.n_embd, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg),
                                     embedding_init=embedding_init(cfg, 0.02))
        block_cls = self.block_class(Gemma3Block)
        self.layers = [block_cls(cfg, self.lora, is_sliding(cfg, i)) for i in range(cfg.n_layer)]  # layers_0, ...
        self.norm = RMSNorm(cfg.layer_norm_epsilon, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg),
                            unit_offset=True)
        self.setup_heads()

    def hidden_states(self, tokens, *, positions=None, attention_mask=None, cache=None, deterministic: bool = True):
        """The trunk: final-norm hidden states `[batch, seq, n_embd]` and the updated cache."""
        cfg = self.config
        att = attention_inputs(tokens, positions, attention_mask, cache)
        x = self.embed_tokens(tokens)
        # transformers rounds the scale to the weights' dtype first (sqrt(3072) is 55.5 in bfloat16)
        x = x * jnp.asarray(cfg.n_embd ** 0.5, param_dtype(cfg)).astype(x.dtype)
        full = (att["mask"], att["is_causal"], rope_tables(cfg, att["positions"]))
        local = full
        if cfg.sliding_window:
            sliding = [i for i in range(cfg.n_layer) if is_sliding(cfg, i)]
            local_cache = cache["layers"][sliding[0]] if cache is not None and sliding else None
            if local_cache is None or not is_ring(local_cache, cfg.sliding_window):
                local_mask = sliding_window_mask(att, cfg.sliding_window)
            else:  # the ring's keys (`init_cache`'s windows)
                ring_len = local_cache["k"].shape[1]
                local_mask = ring_window_mask(att, ring_len, cfg.sliding_window, tokens.shape[1])
            local = (local_mask, att["is_causal"], rope_tables(cfg, att["positions"], cfg.rope_local_theta, scaled=False))
        x, new_cache = self.run_blocks(x, att, deterministic, cache,
                                       per_layer=lambda i: local if is_sliding(cfg, i) else full)
        return self.norm(x), new_cache


# ---------------------------------------------------------------------------------------
# The family

_UNSUPPORTED = ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention", "attention_bias")
# transformers' `Gemma3TextConfig` defaults: what it reads for keys a config.json leaves out (the
# multimodal checkpoints' text_config omits most of them)
_TEXT_DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
                  "rms_norm_eps": 1e-6, "sliding_window": 4096, "query_pre_attn_scalar": 256, "tie_word_embeddings": True}
# The language model's names in a multimodal checkpoint (transformers 5, and 4's as on the hub) -> Gemma3ForCausalLM's
_MULTIMODAL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head."))
_IMAGE_SIDE = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


class Gemma3Family(LlamaFamily):
    name = "gemma3"
    title = "Gemma 3"
    module = Gemma3
    hf_model_type = "gemma3_text"
    hf_architecture = "Gemma3ForCausalLM"
    hf_classifier = "Gemma3TextForSequenceClassification"
    hf_model_types_read = ("gemma3",)  # Gemma3ForConditionalGeneration: its language model
    sliding_window_layers = True

    def flops_per_token(self, config, seq_len: int | None = None, training: bool = True) -> float:
        """`Family`'s count, with a sliding-window layer's attention over at most `sliding_window` keys."""
        t = seq_len or config.context_length
        mult = 6 if training else 2
        n_matmul = config.n_layer * self.layer_matmul_params(config) + config.n_embd * config.vocab_size
        keys = sum(min(t, config.sliding_window) if is_sliding(config, i) else t for i in range(config.n_layer))
        return mult * n_matmul + (mult * 2) * config.n_head * config.head_dim * keys

    def init_cache(self, config, batch_size: int, max_len: int | None = None):
        """`kv_cache.init_cache` with a ring of `sliding_window` slots for each sliding-window layer."""
        windows = [config.sliding_window if is_sliding(config, i) else 0 for i in range(config.n_layer)]
        return init_cache(config, batch_size, max_len, windows)

    def validate(self, config) -> None:
        super().validate(config)
        if config.rope_scaling.type not in ("", "linear"):
            raise UserError(f"model.family gemma3 scales rotary positions linearly or not at all; got "
                            f"model.rope_scaling.type={config.rope_scaling.type}")

    # -- Hugging Face ----------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], where: str = "config.json"):
        """A `ModelConfig` from a `gemma3_text` config.json dict, or a multimodal `gemma3` one's
        `text_config`. Keys it lacks take transformers' `Gemma3TextConfig` defaults (e.g. head_dim
        256, sliding window 4096, every 6th layer global, rotary bases 1e6 / 1e4), as transformers
        reads the same file; softcapping, bidirectional attention, biases and layer patterns other
        than "every N-th layer global" are a UserError."""
        from jaxgpt.config import ModelConfig, RopeScaling
        from jaxgpt.models.llama import _SHAPE_KEYS

        if hf.get("model_type") == "gemma3":
            if not isinstance(hf.get("text_config"), Mapping):
                raise UserError(f"{where}: a multimodal gemma3 config.json needs a text_config object")
            hf = hf["text_config"]
        hf = {**_TEXT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in _TEXT_DEFAULTS}}
        shape = {field: hf_shape(hf, keys, where) for field, keys in _SHAPE_KEYS.items()}
        heads = shape["n_head"]
        kv = hf_shape(hf, ("num_key_value_heads",), where)
        head_dim = hf_shape(hf, ("head_dim",), where)
        if heads % kv:
            raise UserError(f"{where}: num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise UserError(f"{where}: hidden_activation is {act!r}; jaxgpt's Gemma 3 MLP computes gelu_pytorch_tanh")
        for key in _UNSUPPORTED:
            if hf.get(key):
                raise UserError(f"{where}: {key}={hf[key]!r} is not supported by jaxgpt's Gemma 3")
        window, pattern = self._layer_pattern(hf, shape["n_layer"], where)
        full, local = self._rope(hf, where)
        scalar = hf_shape(hf, ("query_pre_attn_scalar",), where)
        scaling = RopeScaling() if full.get("rope_type", "default") == "default" else RopeScaling(
            type="linear", factor=float(full["factor"]))
        return ModelConfig(
            family=self.name, **shape, n_kv_head=kv, head_size=head_dim if head_dim * heads != shape["n_embd"] else 0,
            dropout=float(hf.get("attention_dropout") or 0.0), qkv_bias=False,
            tie_embeddings=bool(hf["tie_word_embeddings"]), layer_norm_epsilon=float(hf["rms_norm_eps"]),
            rope_theta=float(full.get("rope_theta", 1e6)), rope_scaling=scaling, rope_local_theta=float(local.get("rope_theta", 1e4)), sliding_window=window,
            sliding_window_pattern=pattern, query_pre_attn_scalar=scalar)

    @staticmethod
    def _layer_pattern(hf: Mapping[str, Any], n_layer: int, where: str) -> tuple[int, int]:
        """`(sliding_window, sliding_window_pattern)` from `layer_types` (or the older
        `sliding_window_pattern`); `(0, 6)` when every layer is global."""
        types = hf.get("layer_types")
        if types is None:
            pattern = hf.get("sliding_window_pattern", 6)
            if not isinstance(pattern, int) or pattern < 1:
                raise UserError(f"{where}: sliding_window_pattern must be a positive integer, got {pattern!r}")
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
        if not isinstance(types, list) or len(types) != n_layer or not set(types) <= {"full_attention", "sliding_attention"}:
            raise UserError(f"{where}: layer_types must list full_attention / sliding_attention for each of the "
                            f"{n_layer} layers")
        if "sliding_attention" not in types:
            return 0, 6
        pattern = types.index("full_attention") + 1 if "full_attention" in types else n_layer + 1
        if any((t == "full_attention") != ((i + 1) % pattern == 0) for i, t in enumerate(types)):
            raise UserError(f"{where}: layer_types must make every N-th layer full_attention (Gemma 3's pattern); "
                            f"got {types}")
        window = hf["sliding_window"]
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise UserError(f"{where}: sliding_window must be a positive integer, got {window!r}")
        return window, pattern

    @staticmethod
    def _rope(hf: Mapping[str, Any], where: str) -> tuple[dict, dict]:
        """The global and the sliding layers' rotary parameters: transformers 5's
        `rope_parameters` per layer type, or 4's `rope_theta`, `rope_scaling` and
        `rope_local_base_freq`."""
        params = hf.get("rope_parameters") or {}
        if params:
            full = dict(params.get("full_attention") or {})
            local = dict(params.get("sliding_attention") or {})
        else:
            full = {"rope_theta": hf.get("rope_theta", 1e6), **(hf.get("rope_scaling") or {})}
            local = {"rope_theta": hf.get("rope_local_base_freq", 1e4)}
        full.setdefault("rope_type", full.get("type", "default"))
        if full["rope_type"] not in ("default", "linear"):
            raise UserError(f"{where}: rope scaling {full['rope_type']!r} is not supported (jaxgpt's Gemma 3 "
                            f"implements linear)")
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise UserError(f"{where}: the sliding-window layers' rotary positions must be unscaled")
        return full, local

    def hf_target(self, key: str) -> Target | None:
        """Llama's table; in a multimodal checkpoint the language model's tensors under their
        prefix, the image side (vision tower, projector) skipped."""
        for prefix, plain in _MULTIMODAL_PREFIXES:
            if key.startswith(prefix):
                return super().hf_target(plain + key[len(prefix):])
        if key.startswith(_IMAGE_SIDE):
            return Target(None)
        return super().hf_target(key)

    def config_to_hf(self, config) -> dict[str, Any]:
        scaling = {"rope_type": "linear", "factor": config.rope_scaling.factor} if config.rope_scaling.type else None
        return {
            "architectures": [self.hf_architecture], "model_type": self.hf_model_type, "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd, "intermediate_size": config.mlp_width, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
            "max_position_embeddings": config.context_length, "rms_norm_eps": config.layer_norm_epsilon,
            "rope_theta": config.rope_theta, "rope_scaling": scaling, "rope_local_base_freq": config.rope_local_theta,
            "sliding_window": config.sliding_window or config.context_length,  # unused then, but transformers needs one
            "layer_types": ["sliding_attention" if is_sliding(config, i) else "full_attention"
                            for i in range(config.n_layer)],
            "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_dim,
            "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attention_dropout": config.dropout,
            "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "tie_word_embeddings": config.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
            "dtype": "float32",
        }


FAMILY = Gemma3Family()

__all__ = ["FAMILY", "Gemma3", "Gemma3Block", "Gemma3Family", "is_sliding"]
