"""Building configs: defaults <- YAML files <- `--model-config` <- `--set` overrides
(later layers win), every key checked against its field's type, then `validate`d."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from jaxgpt.config.checks import validate
from jaxgpt.config.sections import FAMILY_DEFAULTS, PRESET_KEYS, PRESETS, Config, ModelConfig
from jaxgpt.errors import UserError



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
    if cls is ModelConfig and isinstance(data.get("family"), str):  # a family's own defaults
        data = {**FAMILY_DEFAULTS.get(data["family"], {}), **data}
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


def with_local_paths(data: dict, folder: Path) -> dict:
    """`data` (a config file's mapping) with a relative `model.tokenizer` that names a folder
    beside the file made absolute: a run keeps its tokenizer in `RUN/tokenizer`."""
    model = data.get("model")
    tok = model.get("tokenizer") if isinstance(model, Mapping) else None
    if isinstance(tok, str) and tok != "gpt2" and not Path(tok).is_absolute() and (folder / tok).is_dir():
        data = {**data, "model": {**model, "tokenizer": str((folder / tok).resolve())}}
    return data


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
    model_from_init: bool = False,
):
    """Defaults <- `base` <- YAML file <- `model_file`'s model section <- `--set` overrides
    (later layers win, presets included), then validated. `model_file` (`--model-config
    FILE`) takes only the model shape from any config file (e.g. configs/gpt2-124m.yaml for a
    fine-tuning task, whose other sections differ).

    check_vocab: require `model.vocab_size` >= the tokenizer's 50,257 ids. None (default)
    checks unless the config is a run's own (`base` given, or `path` is RUN/config.yaml):
    a saved run's vocabulary is that of its weights.
    model_from_init: the model section will be the `--init` checkpoint's, so nothing is
    checked against this one's shape (the engine checks again once the checkpoint is read).
    """
    model_layer: dict[str, Any] = {}
    if model_file is not None:
        model = read_yaml(model_file).get("model")
        if not isinstance(model, Mapping):
            raise UserError(f"--model-config {model_file}: the file has no model section")
        model_layer = {"model": model}
    data: dict[str, Any] = {}
    file_layer = with_local_paths(read_yaml(path), Path(path).parent) if path is not None else {}
    for layer in (base or {}, file_layer, model_layer, parse_overrides(overrides)):
        data = _merge_layer(data, layer)
    cfg = from_dict(cls, data)
    if check_vocab is None:
        check_vocab = base is None and not is_run_config(path)
    validate(cfg, check_vocab=check_vocab and not model_from_init, model_from_init=model_from_init)
    return cfg


def save_config(cfg, path: str | Path) -> None:
    """Write `cfg` as YAML, atomically (a full disk is one `DiskFull` line)."""
    from jaxgpt.io.files import atomic_write

    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg, **sections):
    """`replace(cfg, train={"max_steps": 5})`: a copy with some fields of some sections changed."""
    changes = {}
    for name, values in sections.items():
        current = getattr(cfg, name)
        changes[name] = from_dict(type(current), {**dataclasses.asdict(current), **values}, name)
    return dataclasses.replace(cfg, **changes)


