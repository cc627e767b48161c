"""The config sections: typed, frozen dataclasses with their defaults and the known choices
(presets, compute dtypes, attention kinds, remat policies, init schemes, train modes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """GPT-2 architecture. Defaults are GPT-2 124M as OpenAI released it."""

    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1
    qkv_bias: bool = True
    tie_embeddings: bool = True
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
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
        return self.n_embd // self.n_head


_GPT2 = dict(vocab_size=50257, context_length=1024)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-355m": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1558m": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
}
PRESET_KEYS = frozenset(k for preset in PRESETS.values() for k in preset)
# The names in jax.checkpoint_policies that are policies themselves (the others, such as
# save_only_these_names, are factories that need arguments a config cannot give).
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
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
    text_field: str = "text"  # the feature read from tfds records


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


