"""Typed, frozen run configuration: YAML files, presets and dotted `--set` overrides.

A config is a tree of frozen dataclasses. It is built from (in order) the dataclass
defaults, a YAML file, then `--set section.key=value` overrides; every key must name a
field, every value must have the field's type, and `validate` checks ranges. The resolved
config is written into each run directory as `config.yaml`, so a run can be resumed or
reloaded without the file it started from.

The `model` section may name a `preset` (`gpt2-124m`, ...); its fields are filled from the
preset first and then any other keys given override them.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from jaxgpt.errors import UserError


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
    attention: str = "reference"  # reference (einsum) | xla | cudnn (jax.nn.dot_product_attention)
    remat: bool = False  # jax.checkpoint each block
    remat_policy: str = "nothing_saveable"  # a name in jax.checkpoint_policies
    init: str = "gpt2"  # random init: gpt2 (N(0, 0.02), scaled residuals) | torch-default (the book's)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-355m": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600),
}


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


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------
# Building configs from dicts, YAML and overrides


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against a field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(typ)
    if origin in (tuple, Sequence) or typ is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config {where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(typ) or (str,)
        return tuple(_coerce(v, item_type, where) for v in value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config {where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config {where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config {where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config {where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, where)
    return value


def from_dict(cls, data: Mapping[str, Any] | None, where: str = ""):
    """Build dataclass `cls` from a (possibly nested) mapping; unknown keys are an error."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise UserError(f"config {where or 'root'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    if cls is ModelConfig and "preset" in data:
        preset = data.pop("preset")
        if preset not in PRESETS:
            raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
        data = {**PRESETS[preset], **data}
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(types_)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, types_[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    def convert(v):
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        return v

    return {k: convert(v) if not isinstance(v, dict) else v for k, v in dataclasses.asdict(cfg).items()}


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["model.n_layer=4", "train.lr=1e-3"]` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    cls=Config,
    base: Mapping[str, Any] | None = None,
):
    """Defaults <- `base` <- YAML file <- `--set` overrides, then validated."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _merge(data, read_yaml(path))
    data = _merge(data, parse_overrides(overrides))
    # A preset given by override replaces the file's model shape, not only its name.
    cfg = from_dict(cls, data)
    validate(cfg)
    return cfg


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg, **sections):
    """`replace(cfg, train={"max_steps": 5})`: a copy with some fields of some sections changed."""
    changes = {}
    for name, values in sections.items():
        current = getattr(cfg, name)
        changes[name] = from_dict(type(current), {**dataclasses.asdict(current), **values}, name)
    return dataclasses.replace(cfg, **changes)


def validate(cfg) -> None:
    """Range checks that no type can express. Raises `UserError` naming the key."""
    m = getattr(cfg, "model", None)
    if isinstance(m, ModelConfig):
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            if getattr(m, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(m, name)}")
        if m.n_embd % m.n_head:
            raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
        if not 0.0 <= m.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
        if m.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
        if m.attention not in ("reference", "xla", "cudnn"):
            raise UserError(f"model.attention must be reference, xla or cudnn, got {m.attention!r}")
        if m.init not in ("gpt2", "torch-default"):
            raise UserError(f"model.init must be gpt2 or torch-default, got {m.init!r}")
    d = getattr(cfg, "data", None)
    if isinstance(d, DataConfig):
        if d.stride < 0 or d.context_length < 0:
            raise UserError(f"data.stride and data.context_length must be >= 0, got {d.stride}, {d.context_length}")
        if isinstance(m, ModelConfig) and d.context_length > m.context_length:
            raise UserError(
                f"data.context_length={d.context_length} is longer than the model's context "
                f"(model.context_length={m.context_length}); use at most {m.context_length}"
            )
        if not 0.0 <= d.val_ratio < 1.0:
            raise UserError(f"data.val_ratio must be in [0, 1), got {d.val_ratio}")
    t = getattr(cfg, "train", None)
    if isinstance(t, TrainConfig):
        if t.lr <= 0:
            raise UserError(f"train.lr must be positive, got {t.lr}")
        for name in ("batch_size", "grad_accum_steps", "max_steps", "log_interval", "eval_interval"):
            if getattr(t, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(t, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "num_devices", "eval_batches",
                     "checkpoint_interval", "sample_tokens"):
            if getattr(t, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.eval_train_batches < 0:
            raise UserError(f"train.eval_train_batches must be >= 0, got {t.eval_train_batches}")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        if t.keep_checkpoints < 1:
            raise UserError(f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
