"""The config sections: typed, frozen dataclasses with their defaults and the known choices
(presets, compute dtypes, attention kinds, remat policies, init schemes, train modes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """`model.rope_scaling`: how rotary frequencies are stretched for long contexts.

    `linear` (Gemma 3 from 4B up, its global layers): every inverse frequency divided by `factor`.
    `llama3` (Llama 3.1 / 3.2): wavelengths longer than `original_context / low_freq_factor`
    are divided by `factor`, those shorter than `original_context / high_freq_factor` kept,
    the band between interpolated (transformers' `_compute_llama3_parameters`). "" = none."""

    type: str = ""  # "" | llama3 | linear (inv_freq / factor: Gemma 3's global layers)
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """A transformer of one family (`jaxgpt.models`: gpt2, llama, qwen3, gemma3) and its shape.
    Defaults are GPT-2 124M as OpenAI released it; fields a family does not use keep their
    defaults (checked by the family)."""

    family: str = "gpt2"  # gpt2 | llama | qwen3 | gemma3: the module that builds the model (jaxgpt.models)
    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int = 0  # key/value heads (grouped-query attention, llama/qwen3/gemma3); 0 = n_head
    head_size: int = 0  # width of one attention head; 0 = n_embd // n_head (Qwen3 sets its own)
    mlp_dim: int = 0  # MLP hidden units; 0 = 4 * n_embd
    dropout: float = 0.1
    qkv_bias: bool = True
    tie_embeddings: bool = True
    layer_norm_epsilon: float = 1e-5  # LayerNorm (gpt2) or RMSNorm (llama, qwen3, gemma3) epsilon
    rope_theta: float = 10000.0  # rotary position base (llama, qwen3; gemma3's global layers)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # gemma3: every `sliding_window_pattern`-th layer attends to the whole context, the others to
    # the last `sliding_window` slots (0 = every layer global), with rotary base `rope_local_theta`
    sliding_window: int = 0
    sliding_window_pattern: int = 6
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: int = 0  # gemma3: scores scaled by its -1/2 power; 0 = head_dim
    tokenizer: str = "gpt2"  # gpt2 (tiktoken, offline) | a folder with tokenizer.json (jaxgpt.text)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    # storage of the model's weights: float32 | bfloat16 (e.g. the frozen base of a LoRA run: half
    # the memory; LoRA adapters, the value head and optimiser moments of float32 weights stay float32)
    param_dtype: str = "float32"
    # reference (einsum, materialises the scores) | xla | cudnn (jax.nn.dot_product_attention;
    # no attention dropout, so with dropout > 0 in training they run reference) | blockwise
    # (flash-style tiles, scores never materialised, dropout honoured; jaxgpt.models.attention) |
    # auto (cudnn on NVIDIA for causal bf16/fp16, else xla on GPU/TPU, blockwise with dropout there;
    # on CPU blockwise from 256 keys causal / 1024 with a padding or cache mask, else reference)
    attention: str = "reference"
    remat: bool = False  # recompute each block's activations in the backward pass
    # a name in jax.checkpoint_policies; nothing_saveable (keep only each block's input) runs
    # through jaxgpt.models.recompute.recompute_after_cotangent, which XLA:CPU honours too; others nn.remat
    remat_policy: str = "nothing_saveable"
    init: str = "gpt2"  # random init: gpt2 (N(0, 0.02), scaled residuals) | torch-default (the book's)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        return self.mlp_dim or 4 * self.n_embd


_GPT2 = dict(vocab_size=50257, context_length=1024)
_LLAMA3 = dict(family="llama", vocab_size=128256, context_length=131072, n_kv_head=8, qkv_bias=False, dropout=0.0,
               layer_norm_epsilon=1e-5, rope_theta=500000.0)
_LLAMA3_ROPE = dict(type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192)
_QWEN3 = dict(family="qwen3", vocab_size=151936, context_length=40960, n_kv_head=8, head_size=128, qkv_bias=False,
              dropout=0.0, layer_norm_epsilon=1e-6, rope_theta=1000000.0)
_GEMMA3 = dict(family="gemma3", vocab_size=262144, context_length=32768, n_kv_head=1, head_size=256, qkv_bias=False,
               dropout=0.0, layer_norm_epsilon=1e-6, rope_theta=1000000.0, rope_local_theta=10000.0, sliding_window=512,
               sliding_window_pattern=6, query_pre_attn_scalar=256, tie_embeddings=True)
_GEMMA3_MM = dict(_GEMMA3, vocab_size=262208, context_length=131072, sliding_window=1024,
                  rope_scaling=dict(type="linear", factor=8.0))
# The shapes of the released models (each preset's parameter count equals transformers' model
# of the same config: tests/test_llama_qwen.py). Weights: `--init NAME` (jaxgpt.io.hub).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-355m": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1558m": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    "llama-3.2-1b": dict(_LLAMA3, n_layer=16, n_head=32, n_embd=2048, mlp_dim=8192, tie_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama-3.2-3b": dict(_LLAMA3, n_layer=28, n_head=24, n_embd=3072, mlp_dim=8192, tie_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama-3.1-8b": dict(_LLAMA3, n_layer=32, n_head=32, n_embd=4096, mlp_dim=14336, tie_embeddings=False,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
    "qwen3-0.6b": dict(_QWEN3, n_layer=28, n_head=16, n_embd=1024, mlp_dim=3072, tie_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, n_layer=28, n_head=16, n_embd=2048, mlp_dim=6144, tie_embeddings=True),
    "qwen3-4b": dict(_QWEN3, n_layer=36, n_head=32, n_embd=2560, mlp_dim=9728, tie_embeddings=True),
    "qwen3-8b": dict(_QWEN3, n_layer=36, n_head=32, n_embd=4096, mlp_dim=12288, tie_embeddings=False),
    "gemma-3-270m": dict(_GEMMA3, n_layer=18, n_head=4, n_embd=640, mlp_dim=2048),
    "gemma-3-1b": dict(_GEMMA3, n_layer=26, n_head=4, n_embd=1152, mlp_dim=6912),
    # the language models of the multimodal 4B / 12B / 27B checkpoints
    "gemma-3-4b": dict(_GEMMA3_MM, n_layer=34, n_head=8, n_kv_head=4, n_embd=2560, mlp_dim=10240),
    "gemma-3-12b": dict(_GEMMA3_MM, n_layer=48, n_head=16, n_kv_head=8, n_embd=3840, mlp_dim=15360),
    "gemma-3-27b": dict(_GEMMA3_MM, n_layer=62, n_head=32, n_kv_head=16, n_embd=5376, mlp_dim=21504, head_size=128,
                        query_pre_attn_scalar=168),
}
# The shape keys a later preset replaces (`jaxgpt.config.loading`); settings such as dropout,
# qkv_bias or tie_embeddings that an earlier file gave stay.
# The model keys a run keeps over its `--init` checkpoint's (which sets every other: its shape)
INIT_KEPT = ("dropout", "dtype", "param_dtype", "attention", "remat", "remat_policy")
PRESET_KEYS = frozenset({"family", "vocab_size", "context_length", "n_layer", "n_head", "n_embd", "n_kv_head", "head_size",
                         "mlp_dim", "rope_theta", "rope_scaling", "sliding_window", "sliding_window_pattern",
                         "rope_local_theta", "query_pre_attn_scalar"})
# The names in jax.checkpoint_policies that are policies themselves (the others, such as
# save_only_these_names, are factories that need arguments a config cannot give).
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
FAMILIES = ("gpt2", "llama", "qwen3", "gemma3")  # model.family: jaxgpt.models.FAMILY_MODULES (tests keep the two equal)
# What a model section that names a family (and no preset) gets for the keys it leaves out,
# where the family differs from GPT-2's defaults above.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(qkv_bias=False, dropout=0.0, rope_theta=500000.0),
    "qwen3": dict(qkv_bias=False, dropout=0.0, layer_norm_epsilon=1e-6, rope_theta=1000000.0),
    "gemma3": dict(qkv_bias=False, dropout=0.0, layer_norm_epsilon=1e-6, rope_theta=1000000.0, sliding_window=512),
}
ROPE_SCALINGS = ("", "llama3", "linear")
ATTENTION_KINDS = ("reference", "xla", "cudnn", "blockwise", "auto")
MODEL_INITS = ("gpt2", "torch-default")
TRAIN_MODES = ("full", "last-block", "lora")  # finetune.train_mode (jaxgpt.engine.params)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how windows are cut from them."""

    path: str = "the-verdict"  # bundled corpus name | text file | folder of .txt | tfds:NAME[:SPLIT]
    context_length: int = 0  # window length; 0 = model.context_length (may be shorter, never longer)
    stride: int = 0  # 0 means stride = context_length (non-overlapping windows)
    val_ratio: float = 0.1  # the last fraction of the token stream is the validation split
    seed: int = 0  # shuffling seed (separate from train.seed so data order can be held fixed)
    cache_dir: str = ""  # where token files are written; "" = ~/.cache/jaxgpt/tokens
    text_field: str = "text"  # the field read from tfds records, .jsonl corpus lines and .parquet rows


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, logging and checkpoint cadence."""

    batch_size: int = 8  # global batch, in windows, summed over devices and accumulation
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 4e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to matrices only
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0
    num_devices: int = 0  # local devices to pmap over; 0 = all, 1 = plain jit
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 0  # 0 = the whole validation split
    eval_train_batches: int = 0  # > 0: also log train_eval_loss, dropout off, on the first N train batches
    checkpoint_interval: int = 0  # 0 = only at eval points and at the end
    keep_checkpoints: int = 2
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 30
    tensorboard: bool = False  # also write metrics as TensorBoard scalars to RUN/tensorboard (needs tensorboardX)


@dataclass(frozen=True)
class MeshConfig:
    """`mesh` section: all 1 (the default) = pmap data parallelism over `train.num_devices`;
    otherwise `jax.jit` over a (data, fsdp, tensor) mesh of every device (`jaxgpt.parallel.mesh`):
    params and optimiser state sharded over fsdp, heads and MLP over tensor, batch rows over
    data x fsdp. The product is the device count; one axis may be -1 (the rest)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


