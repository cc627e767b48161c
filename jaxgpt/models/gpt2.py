"""GPT-2 (`model.family: gpt2`): pre-LayerNorm blocks, GELU MLP, learned absolute positions.

Parameter tree (names follow OpenAI/Hugging Face GPT-2, so loading weights is a rename):

    wte/embedding [vocab, d]      wpe/embedding [context, d]
    h_{i}/ln_1/{scale,bias}       h_{i}/attn/c_attn/{kernel [d, 3d], bias}
    h_{i}/attn/c_proj/{kernel [d, d], bias}
    h_{i}/ln_2/{scale,bias}       h_{i}/mlp/c_fc/{kernel [d, 4d], bias}
    h_{i}/mlp/c_proj/{kernel [4d, d], bias}
    ln_f/{scale,bias}             lm_head/kernel [d, vocab]   (only when not tied)
    score/kernel [d, num_classes]  (a classifier, `num_classes > 0`: replaces the LM head)
    value_head/{kernel, bias}      (PPO's critic, `value_head=True`)
    .../lora_a, .../lora_b         (LoRA adapters on targeted dense layers, `jaxgpt.models.lora`)

Dense kernels are `[in, out]`, the same layout as GPT-2's Conv1D weights, so the Hugging Face
converter (`GPT2Family.hf_target`) transposes only the `nn.Linear` LM head:

    HF key (with or without `transformer.`)     jaxgpt path                shape
    wte.weight / wpe.weight                      wte|wpe/embedding          [V, d] / [ctx, d]
    h.{i}.ln_1|ln_2.weight | .bias               h_{i}/ln_1|ln_2/scale|bias [d]
    h.{i}.attn.c_attn.weight | .bias             h_{i}/attn/c_attn/kernel   [d, 3d] | [3d]
    h.{i}.attn.c_proj.weight | .bias             h_{i}/attn/c_proj/kernel   [d, d] | [d]
    h.{i}.mlp.c_fc.weight | .bias                h_{i}/mlp/c_fc/kernel      [d, 4d] | [4d]
    h.{i}.mlp.c_proj.weight | .bias              h_{i}/mlp/c_proj/kernel    [4d, d] | [d]
    ln_f.weight | .bias                          ln_f/scale | bias          [d]
    lm_head.weight                               lm_head/kernel (transposed) [V, d] -> [d, V]

The fused `c_attn` keeps q|k|v concatenated along the output axis in both. The `attn.bias` /
`attn.masked_bias` entries of older checkpoints are causal-mask buffers and are skipped.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jaxgpt.errors import UserError
from jaxgpt.models.family import Family, Target, hf_shape
from jaxgpt.models.kv_cache import write_cache
from jaxgpt.models.layers import Embed, LanguageModel, attend, attention_inputs, compute_dtype, dense, embedding_init, param_dtype
from jaxgpt.models.lora import LoRAConfig
from jaxgpt.models.recompute import LayerNorm, gelu_tanh


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection (`c_attn`)."""

    config: Any
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x, mask, is_causal, deterministic=True, cache_layer=None, cache_index=None):
        """x: `[batch, seq, n_embd]`; mask: `[batch, 1, seq, kv_len]` bool.

        With a cache layer, this call's keys and values are written at `cache_index` and the
        query attends over the whole cache (`kv_len = max_len`).
        """
        cfg = self.config
        b, t, _ = x.shape
        qkv = dense(3 * cfg.n_embd, "c_attn", config=cfg, fan_in=cfg.n_embd, use_bias=cfg.qkv_bias, lora=self.lora,
                    fused=3)(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (a.reshape(b, t, cfg.n_head, cfg.head_dim) for a in (q, k, v))  # [b, t, h, hd]
        new_cache = None
        if cache_layer is not None:
            k, v, new_cache = write_cache(cache_layer, k, v, cache_index)
        y = attend(self, cfg, q, k, v, mask, is_causal, deterministic).reshape(b, t, cfg.n_embd)
        y = dense(cfg.n_embd, "c_proj", config=cfg, fan_in=cfg.n_embd, std=0.02 / math.sqrt(2 * cfg.n_layer),
                  lora=self.lora)(y)
        return y, new_cache


class MLP(nn.Module):
    config: Any
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = dense(4 * cfg.n_embd, "c_fc", config=cfg, fan_in=cfg.n_embd, lora=self.lora)(x)
        h = gelu_tanh(h)  # GPT-2's "gelu_new"; keeps only h for the backward pass
        return dense(cfg.n_embd, "c_proj", config=cfg, fan_in=4 * cfg.n_embd, std=0.02 / math.sqrt(2 * cfg.n_layer),
                     lora=self.lora)(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: Any
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x, mask, is_causal, deterministic=True, cache_layer=None, cache_index=None, rope=None):
        cfg = self.config
        ln = lambda name: LayerNorm(cfg.layer_norm_epsilon, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg), name=name)  # noqa: E731
        drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
        y, new_cache = CausalSelfAttention(cfg, self.lora, name="attn")(
            ln("ln_1")(x), mask, is_causal, deterministic, cache_layer, cache_index
        )
        x = x + drop(y)
        x = x + drop(MLP(cfg, self.lora, name="mlp")(ln("ln_2")(x)))
        return x, new_cache


class GPT(LanguageModel):
    """GPT-2: token + learned position embeddings, `h_i` blocks, final LayerNorm `ln_f`, and the
    heads of `jaxgpt.models.layers.LanguageModel` (the tied head reads `wte`)."""

    def setup(self):
        cfg = self.config
        dtype = compute_dtype(cfg)
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, param_dtype=param_dtype(cfg),
                            embedding_init=embedding_init(cfg, 0.02))
        self.wpe = Embed(cfg.context_length, cfg.n_embd, dtype=dtype, param_dtype=param_dtype(cfg),
                            embedding_init=embedding_init(cfg, 0.01))
        block_cls = self.block_class(Block)
        self.h = [block_cls(cfg, self.lora) for _ in range(cfg.n_layer)]  # named h_0, h_1, ...
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype(cfg))
        # Named as the inline module it used to be, so its dropout masks (derived from the
        # module path) stay what they were.
        self.embed_dropout = nn.Dropout(cfg.dropout, name="Dropout_0")
        self.setup_heads()

    @property
    def blocks(self):
        return self.h

    def token_embedding(self):
        return self.wte

    def hidden_states(self, tokens, *, positions=None, attention_mask=None, cache=None, deterministic: bool = True):
        """The trunk: final-LayerNorm hidden states `[batch, seq, n_embd]` (compute dtype) and
        the updated cache (None without one)."""
        att = attention_inputs(tokens, positions, attention_mask, cache)
        x = self.wte(tokens) + self.wpe(att["positions"])
        x = self.embed_dropout(x, deterministic=deterministic)
        x, new_cache = self.run_blocks(x, att, deterministic, cache)
        return self.ln_f(x), new_cache


# ---------------------------------------------------------------------------------------
# The family: paths, costs, sharding axes and the Hugging Face converter

#: GPT2Config defaults used for keys a config.json leaves out (never the shape keys).
HF_DEFAULTS: dict[str, Any] = {
    "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "resid_pdrop": 0.1, "tie_word_embeddings": True,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh GELU that the MLP computes
_SHAPE_KEYS = {  # ModelConfig field -> accepted config.json keys, first preferred
    "vocab_size": ("vocab_size",),
    "context_length": ("n_positions", "max_position_embeddings", "n_ctx"),
    "n_embd": ("n_embd", "hidden_size"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
}
_HF_LAYER = re.compile(r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)")
_HF_BUFFER = re.compile(r"h\.\d+\.(attn|crossattention)\.(bias|masked_bias)")
_TF_LAYER = re.compile(r"model/h(\d+)/(ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/([gbw])")
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's bos and eos


class GPT2Family(Family):
    name = "gpt2"
    title = "GPT-2"
    module = GPT
    token_embedding = "wte"
    block_prefix = "h"
    final_norm = "ln_f"
    lora_targets = ("c_attn", "c_proj", "c_fc")
    axes_table = (
        ("wte/embedding", ("vocab", "embed")), ("wpe/embedding", (None, "embed")),
        ("attn/c_attn/kernel", ("embed", "qkv")), ("attn/c_attn/bias", ("qkv",)),
        ("attn/c_proj/kernel", ("heads", "embed")), ("mlp/c_fc/kernel", ("embed", "mlp")),
        ("mlp/c_fc/bias", ("mlp",)), ("mlp/c_proj/kernel", ("mlp", "embed")),
        ("lm_head/kernel", ("embed", "vocab")), ("(score|value_head)/kernel", ("embed", None)),
        ("value_head/bias", (None,)), ("(scale|bias)", ("embed",)),  # output biases and the LayerNorms
    )
    hf_model_type = "gpt2"
    hf_architecture = "GPT2LMHeadModel"
    hf_classifier = "GPT2ForSequenceClassification"

    def layer_matmul_params(self, config) -> int:
        return 12 * config.n_embd * config.n_embd

    def validate(self, config) -> None:
        super().validate(config)
        if config.n_kv_head not in (0, config.n_head) or config.head_size not in (0, config.n_embd // config.n_head):
            raise UserError("model.family gpt2 has one key/value head per query head and head_size = n_embd / n_head; "
                            "leave model.n_kv_head and model.head_size at 0")
        if config.mlp_dim not in (0, 4 * config.n_embd):
            raise UserError(f"model.family gpt2's MLP is 4 * n_embd = {4 * config.n_embd} wide; leave model.mlp_dim at 0")

    # -- Hugging Face ----------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], where: str = "config.json"):
        """A `ModelConfig` from a GPT-2 config.json dict: shapes must be present, other keys default
        as in `transformers.GPT2Config`; options this model does not implement are a UserError
        rather than a model that would silently compute something else."""
        from jaxgpt.config import ModelConfig

        shape = {field: hf_shape(hf, keys, where) for field, keys in _SHAPE_KEYS.items()}
        if shape["n_embd"] % shape["n_head"]:
            raise UserError(f"{where}: n_embd ({shape['n_embd']}) is not divisible by n_head ({shape['n_head']})")
        get = lambda k: hf[k] if hf.get(k) is not None else HF_DEFAULTS[k]
        if get("activation_function") not in _TANH_GELUS:
            raise UserError(f"{where}: activation_function is {get('activation_function')!r}; jaxgpt's GPT-2 MLP "
                            "computes gelu_new")
        n_inner = hf.get("n_inner")
        if n_inner is not None and n_inner != 4 * shape["n_embd"]:
            raise UserError(f"{where}: n_inner is {n_inner}; jaxgpt's MLP width is 4 * n_embd = {4 * shape['n_embd']}")
        for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                               ("add_cross_attention", False)):
            if bool(get(key)) != supported:
                raise UserError(f"{where}: {key}={get(key)} is not supported (jaxgpt implements {key}={supported})")
        return ModelConfig(**shape, dropout=float(get("resid_pdrop")), qkv_bias=True,  # HF GPT-2 always has it
                           tie_embeddings=bool(get("tie_word_embeddings")),
                           layer_norm_epsilon=float(get("layer_norm_epsilon")))

    def config_to_hf(self, config) -> dict[str, Any]:
        """A config.json dict that `transformers.GPT2LMHeadModel.from_pretrained` accepts; the
        token ids are GPT-2's `<|endoftext|>` (null when the vocabulary cannot hold it)."""
        eot = GPT2_EOT if config.vocab_size > GPT2_EOT else None
        return {
            "architectures": [self.hf_architecture], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.context_length, "n_ctx": config.context_length, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.layer_norm_epsilon, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "add_cross_attention": False, "use_cache": True, "bos_token_id": eot, "eos_token_id": eot,
            "tie_word_embeddings": config.tie_embeddings, "dtype": "float32",
        }

    def hf_target(self, key: str) -> Target | None:
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name in ("wte.weight", "wpe.weight"):
            return Target((name.split(".")[0], "embedding"))
        if name in ("ln_f.weight", "ln_f.bias"):
            return Target(("ln_f", "scale" if name.endswith("weight") else "bias"))
        if key == "lm_head.weight":
            return Target(("lm_head", "kernel"), "T")
        if _HF_BUFFER.fullmatch(name):
            return Target(None)
        m = _HF_LAYER.fullmatch(name)
        if m is None:
            return None
        layer, module, kind = m.groups()
        leaf = ("scale" if kind == "weight" else "bias") if module.startswith("ln") else (
            "kernel" if kind == "weight" else "bias")
        return Target((f"h_{layer}", *module.split("."), leaf))

    def hf_key(self, path: tuple[str, ...]) -> tuple[str, bool]:
        prefix = "transformer."
        if path == ("lm_head", "kernel"):
            return "lm_head.weight", True
        if path[0] in ("wte", "wpe"):
            return f"{prefix}{path[0]}.weight", False
        leaf = {"scale": "weight", "kernel": "weight", "bias": "bias"}[path[-1]]
        if path[0] == "ln_f":
            return f"{prefix}ln_f.{leaf}", False
        layer = path[0].removeprefix("h_")
        return f"{prefix}h.{layer}.{'.'.join(path[1:-1])}.{leaf}", False

    def openai_target(self, name: str) -> Target | None:
        """Where a variable of OpenAI's TensorFlow release goes: `model/h0/attn/c_attn/w`
        (`[1, d, 3d]`, a 1x1 convolution) is HF's `h.0.attn.c_attn.weight` with its leading 1
        squeezed; LayerNorms have g/b, convolutions w/b. None: no parameter."""
        leaf = lambda kind: "weight" if kind in ("g", "w") else "bias"
        if name in ("model/wte", "model/wpe"):
            return self.hf_target(f"{name.split('/')[1]}.weight")
        if name in ("model/ln_f/g", "model/ln_f/b"):
            return self.hf_target(f"ln_f.{leaf(name[-1])}")
        m = _TF_LAYER.fullmatch(name)
        if m is None:
            return None
        layer, module, kind = m.groups()
        norm = module.startswith("ln")
        if (norm and kind == "w") or (not norm and kind == "g"):
            return None
        target = self.hf_target(f"h.{layer}.{module.replace('/', '.')}.{leaf(kind)}")
        return Target(target.path, "squeeze0" if kind == "w" else target.transform)

    def hf_extra_tensors(self, config) -> dict[str, tuple[int, ...]]:
        """HF GPT-2 always has a c_attn bias: `qkv_bias=False` is written as zeros, exactly the
        same function."""
        if config.qkv_bias:
            return {}
        return {f"transformer.h.{i}.attn.c_attn.bias": (3 * config.n_embd,) for i in range(config.n_layer)}


def num_params_hf(config) -> int:
    """GPT-2's parameter count by arithmetic (as HF counts it: the tied head counted once)."""
    d, V, L = config.n_embd, config.vocab_size, config.n_layer
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    head = 0 if config.tie_embeddings else V * d
    return V * d + config.context_length * d + L * block + 2 * d + head


FAMILY = GPT2Family()
