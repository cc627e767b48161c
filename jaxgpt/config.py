"""Typed, frozen run configuration: YAML files, presets and dotted `--set` overrides.

A config is a tree of frozen dataclasses. It is built from (in order) the dataclass
defaults, a YAML file, then `--set section.key=value` overrides; every key must name a
field, every value must have the field's type, and `validate` checks ranges. The resolved
config is written into each run directory as `config.yaml`, so a run can be resumed or
reloaded without the file it started from.

The `model` section may name a `preset` (`gpt2-124m`, ...); its fields are filled from the
preset first and then any other keys given override them. Later layers win: a preset set by
`--set` (or a later file) replaces the shape keys an earlier file set, while keys given in
the same layer as the preset still override it.

Every value is checked here, before a run directory exists: numbers must be finite, ranges
are checked by `validate`, enumerations must name a known choice, and `model.vocab_size`
must hold the GPT-2 tokenizer's ids (a run's own saved config, reloaded, keeps its vocab).
"""
from __future__ import annotations

import dataclasses
import math
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
ATTENTION_KINDS = ("reference", "xla", "cudnn")
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"config {where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise UserError(f"config {where}: expected a finite number, got {value!r}")
        return number
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config {where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, where)
    return value


def from_dict(cls, data: Mapping[str, Any] | None, where: str = ""):
    """Build dataclass `cls` from a (possibly nested) mapping; unknown keys are an error."""
    if data is not None and not isinstance(data, Mapping):
        raise UserError(f"config {where or 'root'}: expected a section of key: value lines, got {data!r}")
    data = dict(data or {})
    types_ = _field_types(cls)
    if cls is ModelConfig and "preset" in data:
        preset = data.pop("preset")
        if not isinstance(preset, str) or preset not in PRESETS:
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


def _merge_layer(data: dict, layer: Mapping) -> dict:
    """`_merge`, except that a layer naming `model.preset` first drops the shape keys earlier
    layers set, so the later preset wins; shape keys in the layer itself still apply."""
    model = layer.get("model")
    if isinstance(model, Mapping) and "preset" in model and isinstance(data.get("model"), Mapping):
        data = {**data, "model": {k: v for k, v in data["model"].items() if k not in PRESET_KEYS}}
    return _merge(data, layer)


def is_run_config(path: str | Path | None) -> bool:
    """Whether `path` is a run directory's own config.yaml (beside its checkpoints/)."""
    return path is not None and Path(path).name == "config.yaml" and (Path(path).parent / "checkpoints").is_dir()


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    cls=Config,
    base: Mapping[str, Any] | None = None,
    model_file: str | Path | None = None,
    *,
    check_vocab: bool | None = None,
):
    """Defaults <- `base` <- YAML file <- `model_file`'s model section <- `--set` overrides
    (later layers win, presets included), then validated. `model_file` (`--model-config
    FILE`) takes only the model shape from any config file (e.g. configs/gpt2-124m.yaml for a
    fine-tuning task, whose other sections differ).

    check_vocab: require `model.vocab_size` >= the tokenizer's 50,257 ids. None (default)
    checks unless the config is a run's own (`base` given, or `path` is RUN/config.yaml):
    a saved run's vocabulary is that of its weights.
    """
    model_layer: dict[str, Any] = {}
    if model_file is not None:
        model = read_yaml(model_file).get("model")
        if not isinstance(model, Mapping):
            raise UserError(f"--model-config {model_file}: the file has no model section")
        model_layer = {"model": model}
    data: dict[str, Any] = {}
    for layer in (base or {}, read_yaml(path) if path is not None else {}, model_layer, parse_overrides(overrides)):
        data = _merge_layer(data, layer)
    cfg = from_dict(cls, data)
    if check_vocab is None:
        check_vocab = base is None and not is_run_config(path)
    validate(cfg, check_vocab=check_vocab)
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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def one_of(value: str, choices, key: str) -> None:
    """UserError naming `key` unless `value` is one of `choices`."""
    _require(value in choices, f"{key} must be one of {', '.join(choices)}, got {value!r}")


def at_least(section, prefix: str, minimum: float, *names: str) -> None:
    """UserError naming `prefix.name` for the first of `names` in `section` below `minimum`."""
    for name in names:
        value = getattr(section, name)
        _require(value >= minimum, f"{prefix}.{name} must be >= {minimum}, got {value}")


def validate(cfg, *, check_vocab: bool = False) -> None:
    """Range checks that no type can express (non-finite numbers are refused when parsed).
    Raises `UserError` naming the key. `check_vocab`: see `load_config`."""
    m = getattr(cfg, "model", None)
    if isinstance(m, ModelConfig):
        validate_model(m, check_vocab=check_vocab)
    d = getattr(cfg, "data", None)
    if isinstance(d, DataConfig):
        _require(d.stride >= 0 and d.context_length >= 0,
                 f"data.stride and data.context_length must be >= 0, got {d.stride}, {d.context_length}")
        if isinstance(m, ModelConfig) and d.context_length > m.context_length:
            raise UserError(
                f"data.context_length={d.context_length} is longer than the model's context "
                f"(model.context_length={m.context_length}); use at most {m.context_length}"
            )
        _require(0.0 <= d.val_ratio < 1.0, f"data.val_ratio must be in [0, 1), got {d.val_ratio}")
        _require(d.seed >= 0, f"data.seed must be >= 0, got {d.seed}")
        _require(bool(d.path.strip()), "data.path is empty; give a bundled corpus name, a text file, a folder or tfds:NAME")
        _require(bool(d.text_field.strip()), "data.text_field is empty; name the tfds feature that holds the text")
    mesh = getattr(cfg, "mesh", None)
    if isinstance(mesh, MeshConfig):
        sizes = (mesh.data, mesh.fsdp, mesh.tensor)
        _require(all(v >= 1 or v == -1 for v in sizes) and sizes.count(-1) <= 1,
                 f"mesh.data, mesh.fsdp and mesh.tensor must each be >= 1, one of them may be -1 (the rest of "
                 f"the devices); got {', '.join(map(str, sizes))}")
    t = getattr(cfg, "train", None)
    if isinstance(t, TrainConfig):
        validate_train(t)


def validate_model(m: ModelConfig, *, check_vocab: bool = False) -> None:
    for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
        _require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _require(not m.n_embd % m.n_head, f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(m.layer_norm_epsilon > 0, f"model.layer_norm_epsilon must be positive, got {m.layer_norm_epsilon}")
    _require(m.dtype in DTYPES, f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    _require(m.init in MODEL_INITS, f"model.init must be {' or '.join(MODEL_INITS)}, got {m.init!r}")
    _require(m.attention in ATTENTION_KINDS,
             f"model.attention must be {', '.join(ATTENTION_KINDS[:-1])} or {ATTENTION_KINDS[-1]}, got {m.attention!r}")
    _require(m.remat_policy in REMAT_POLICIES,
             f"model.remat_policy {m.remat_policy!r} is not a jax.checkpoint_policies policy; "
             f"choose one of {', '.join(REMAT_POLICIES)}")
    if check_vocab:
        from jaxgpt.tokenizer import N_VOCAB

        _require(m.vocab_size >= N_VOCAB,
                 f"model.vocab_size={m.vocab_size} is smaller than the GPT-2 tokenizer's {N_VOCAB:,} ids; "
                 f"use at least {N_VOCAB} (e.g. 50304, a multiple of 64)")


def validate_train(t: TrainConfig) -> None:
    _require(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    for name in ("batch_size", "grad_accum_steps", "max_steps", "log_interval", "eval_interval"):
        _require(getattr(t, name) > 0, f"train.{name} must be positive, got {getattr(t, name)}")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "num_devices", "eval_batches",
                 "checkpoint_interval", "sample_tokens", "seed", "eval_train_batches"):
        _require(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    for name in ("b1", "b2"):
        _require(0.0 <= getattr(t, name) < 1.0, f"train.{name} must be in [0, 1), got {getattr(t, name)}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _require(not t.sample_tokens or bool(t.sample_prompt),
             "train.sample_prompt is empty; give a prompt or set train.sample_tokens=0")
