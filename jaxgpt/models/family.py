"""The interface a model family implements (`Family`), which is all the rest of jaxgpt sees of it.

A family module (`jaxgpt.models.gpt2`, ...) defines its linen modules and one `FAMILY`, an
instance of a `Family` subclass that fills in the class attributes below and overrides what
differs. The engine, tasks, sampling, sharding and weight I/O use only these:

    build / init_params / param_shapes / init_cache      the module with its heads, params, KV cache
    lm_head_kernel(config, params)                       `[n_embd, vocab]` for the fused loss
    block(i), final_norm, token_embedding, is_trunk(path) the paths train modes and --init need
    lora_targets                                         what `lora.targets: [all]` adapts
    flops_per_token(config, seq, training)               for MFU
    logical_axes(path, shape)                            names per dimension, for sharding
    validate(config)                                     settings this family cannot build
    config_from_hf / config_to_hf / hf_target / hf_key   the Hugging Face converter (`hf_classifier`: with `score`)
    torch_config / torch_model(config)                   the transformers twin (parity tests)

Parameter names are the checkpoint's own (GPT-2: `wte`, `h_0/attn/c_attn`; Llama: `embed_tokens`,
`layers_0/self_attn/q_proj`), so the Hugging Face converter is a rename table.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping, NamedTuple

from jaxgpt.errors import UserError

# Logical axis names a family may give a parameter dimension (`logical_axes`); the mesh maps
# them to devices (`jaxgpt.parallel.mesh`). None: a dimension no rule splits by meaning.
LOGICAL_AXES = ("vocab", "embed", "qkv", "heads", "kv_heads", "mlp", "head_dim")


class Target(NamedTuple):
    """Where a checkpoint tensor goes: a jaxgpt param path, or `None` to skip it (a buffer, or
    the image side of a multimodal checkpoint)."""

    path: tuple[str, ...] | None
    transform: str = ""  # "" | "T" (transpose [out, in] -> [in, out]) | "squeeze0" (drop a leading 1)


class Family:
    """One model family; see the module docstring. Subclasses set the class attributes."""

    name: ClassVar[str]  # model.family
    title: ClassVar[str]  # how people write it ("GPT-2")
    module: ClassVar[type]  # a `jaxgpt.models.layers.LanguageModel` subclass
    token_embedding: ClassVar[str]  # top-level name of the token embedding (the tied head reads it)
    block_prefix: ClassVar[str]  # blocks are `{block_prefix}_{i}`
    final_norm: ClassVar[str]
    lora_targets: ClassVar[tuple[str, ...]]  # the dense layers of a block (what `all` adapts, with a task head)
    # (path-suffix regex, axes) pairs, first match wins
    axes_table: ClassVar[tuple[tuple[str, tuple], ...]]
    hf_model_type: ClassVar[str]  # config.json's model_type (what an export writes)
    hf_model_types_read: ClassVar[tuple[str, ...]] = ()  # more model_types it loads (Gemma 3's multimodal)
    hf_architecture: ClassVar[str]  # config.json's architectures[0] / the transformers class
    hf_classifier: ClassVar[str]  # the same with a `score` head (*ForSequenceClassification): a classifier's export
    sliding_window_layers: ClassVar[bool] = False  # reads model.sliding_window, query_pre_attn_scalar (Gemma 3)

    # -- the module ------------------------------------------------------------------------
    def build(self, config, *, num_classes: int = 0, value_head: bool = False, lora=None):
        """The linen module: `apply({"params": p}, tokens, ...)` (`jaxgpt.models.layers.LanguageModel`)."""
        return self.module(config, num_classes=num_classes, value_head=value_head, lora=lora)

    def init_params(self, config, key, seq_len: int = 8, **attrs):
        """Float32 params (a plain dict pytree, no `{"params": ...}` wrapper)."""
        import jax.numpy as jnp

        tokens = jnp.zeros((1, min(seq_len, config.context_length)), jnp.int32)
        return self.build(config, **attrs).init({"params": key}, tokens)["params"]

    def param_shapes(self, config, **attrs):
        """Parameter shapes (`jax.ShapeDtypeStruct`s) without allocating."""
        import jax
        import jax.numpy as jnp

        model = self.build(config, **attrs)
        tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        return jax.eval_shape(lambda t: model.init({"params": jax.random.key(0)}, t), tokens)["params"]

    def init_cache(self, config, batch_size: int, max_len: int | None = None):
        from jaxgpt.models.kv_cache import init_cache

        return init_cache(config, batch_size, max_len)

    def lm_head_kernel(self, config, params):
        """The LM head's kernel `[n_embd, vocab]` (`lm_logits` is `hidden @ it`): the tied token
        embedding transposed, or `lm_head/kernel`. For the fused head + loss
        (`jaxgpt.train.losses.head_cross_entropy`, `head_logprobs`), which never forms the logits."""
        if config.tie_embeddings:
            return params[self.token_embedding]["embedding"].T
        return params["lm_head"]["kernel"]

    # -- paths -----------------------------------------------------------------------------
    def block(self, i: int) -> str:
        return f"{self.block_prefix}_{i}"

    def last_block_params(self, config) -> set[str]:
        """Top-level params `--train-mode last-block` trains (task heads are added by the caller)."""
        return {self.block(config.n_layer - 1), self.final_norm}

    def is_trunk(self, path: tuple[str, ...]) -> bool:
        """Whether a param belongs to the transformer an `--init` checkpoint must provide (not a
        task head, not the LM head, which a task model may replace or lack)."""
        from jaxgpt.models.layers import HEAD_PARAMS

        return path[0] not in HEAD_PARAMS and path[0] != "lm_head"

    # -- costs -----------------------------------------------------------------------------
    def layer_matmul_params(self, config) -> int:
        """Weights in one block's matmuls (attention projections and the MLP)."""
        raise NotImplementedError

    def flops_per_token(self, config, seq_len: int | None = None, training: bool = True) -> float:
        """Model FLOPs per token: 6N (forward + backward matmuls; 2N for inference) plus attention
        scores and values, 12 * n_layer * heads * head_dim * seq (6 * ... for inference); PaLM
        appendix B. N counts the blocks' matmul weights plus the LM head (embedding lookups do
        no FLOPs, but the head is a real `[n_embd, vocab]` matmul, tied or not)."""
        t = seq_len or config.context_length
        n_matmul = config.n_layer * self.layer_matmul_params(config) + config.n_embd * config.vocab_size
        mult = 6 if training else 2
        return mult * n_matmul + (mult * 2) * config.n_layer * config.n_head * config.head_dim * t

    # -- sharding --------------------------------------------------------------------------
    def logical_axes(self, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple:
        """A logical axis name (`LOGICAL_AXES`) or None per dimension of the param at `path`
        (an optimiser moment's path ends with its param's). LoRA adapters (small: their rank
        axis is the narrow one) and unknown paths: all None."""
        key = "/".join(path)
        if path and path[-1] not in ("lora_a", "lora_b"):
            for pattern, axes in self.axes_table:
                if re.search(f"(^|/){pattern}$", key):
                    return tuple(axes) if len(axes) == len(shape) else (None,) * len(shape)
        return (None,) * len(shape)

    # -- checks ----------------------------------------------------------------------------
    def validate(self, config) -> None:
        """UserError for settings this family cannot build (checked before a run writes)."""
        if not self.sliding_window_layers and (config.sliding_window or config.query_pre_attn_scalar):
            raise UserError(f"model.sliding_window and model.query_pre_attn_scalar are Gemma 3's; model.family "
                            f"{self.name} has neither: leave them at 0")

    # -- Hugging Face ----------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], where: str = "config.json"):
        raise NotImplementedError

    def config_to_hf(self, config) -> dict[str, Any]:
        raise NotImplementedError

    def hf_target(self, key: str) -> Target | None:
        """Where the HF tensor `key` goes (None: not this family's)."""
        raise NotImplementedError

    def hf_key(self, path: tuple[str, ...]) -> tuple[str, bool]:
        """`(HF key, transposed)` of a jaxgpt param path (the inverse of `hf_target`)."""
        raise NotImplementedError

    def hf_extra_tensors(self, config) -> dict[str, tuple[int, ...]]:
        """Tensors HF expects that jaxgpt does not hold, written as zeros (GPT-2's absent qkv bias)."""
        return {}

    def torch_config(self, config, attn_implementation: str = "eager"):
        """The transformers config of `config` (`eager`: the plain softmax attention jaxgpt's
        reference computes; `sdpa` is faster on CPU for large shapes)."""
        import transformers

        hf = {k: v for k, v in self.config_to_hf(config).items() if k not in ("architectures", "dtype", "model_type")}
        cfg = transformers.AutoConfig.for_model(self.hf_model_type, **hf)
        cfg._attn_implementation = attn_implementation
        return cfg

    def torch_model(self, config, attn_implementation: str = "eager"):
        """A float32 transformers model of `config` (random weights): the parity twin."""
        import torch
        import transformers

        return getattr(transformers, self.hf_architecture)(self.torch_config(config, attn_implementation)).to(torch.float32)


def hf_shape(hf: Mapping[str, Any], keys: tuple[str, ...], where: str, *, required: bool = True) -> int | None:
    """The first of `keys` present in a config.json dict, as a positive int (one-line errors)."""
    found = [k for k in keys if hf.get(k) is not None]
    if not found:
        if required:
            raise UserError(f"{where}: missing {keys[0]}")
        return None
    value = hf[found[0]]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{where}: {found[0]} must be a positive integer, got {value!r}")
    return value


__all__ = ["Family", "LOGICAL_AXES", "Target", "hf_shape"]
