"""`--init SPEC`: the one resolver from a user's weight spec to `(ModelConfig, params)`.

Accepted forms, tried in this order:

1. a jaxgpt run directory (holds `config.yaml`): its latest checkpoint, through
   `jaxgpt.checkpoint.load_params`;
2. a Hugging Face GPT-2 directory (holds `config.json`, plus `model.safetensors`, a sharded
   `model.safetensors.index.json`, or `pytorch_model.bin` when torch is installed);
3. OpenAI's original TensorFlow release directory (holds `hparams.json` and
   `model.ckpt.*`; needs TensorFlow);
4. a preset name: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (or jaxgpt's names for the
   same shapes, `gpt2-124m`, `gpt2-355m`, `gpt2-774m`, `gpt2-1558m`). Its config.json and
   model.safetensors are downloaded once from huggingface.co/openai-community/NAME into
   `$JAXGPT_CACHE/hf/NAME` (default `~/.cache/jaxgpt/hf/NAME`) and read from there after.
"""
from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.lora import LoRAConfig, has_lora, merge_lora
from jaxgpt.weights import check_params, load_hf_dir, load_openai_dir

Params = dict[str, Any]

HF_BASE_URL = "https://huggingface.co/openai-community"  # + /NAME/resolve/main/FILE
HF_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
PRESET_ALIASES = {"gpt2-124m": "gpt2", "gpt2-355m": "gpt2-medium", "gpt2-774m": "gpt2-large",
                  "gpt2-1558m": "gpt2-xl"}
PRESET_FILES = ("config.json", "model.safetensors")
ACCEPTED = ("a jaxgpt run directory (config.yaml + checkpoints/), a Hugging Face GPT-2 directory "
            "(config.json + model.safetensors), an OpenAI TensorFlow checkpoint directory "
            "(hparams.json + model.ckpt.*), or a preset: " + ", ".join(HF_PRESETS))


def cache_root() -> Path:
    """`$JAXGPT_CACHE` or `~/.cache/jaxgpt`; presets live under `hf/NAME` in it."""
    return Path(os.environ.get("JAXGPT_CACHE") or "~/.cache/jaxgpt").expanduser()


def preset_dir(name: str) -> Path:
    return cache_root() / "hf" / name


def _download(url: str, dest: Path) -> None:
    """Stream `url` to `dest.part` with a progress bar, then rename: `dest` is complete or absent."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            done = 0
            with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        if total is not None and done != total:
            raise urllib.error.URLError(f"got {done} of {total} bytes")
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()


def download_preset(name: str) -> Path:
    """The local directory of preset `name` (one of `HF_PRESETS`), downloading what is missing.

    Plain `urllib` from `HF_BASE_URL/NAME/resolve/main/FILE`; offline (or any failure) is a
    one-line `UserError` saying which files to put where by hand.
    """
    target = preset_dir(name)
    missing = [f for f in PRESET_FILES if not (target / f).is_file()]
    if not missing:
        return target
    page = f"https://huggingface.co/openai-community/{name}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for file in missing:
            _download(f"{HF_BASE_URL}/{name}/resolve/main/{file}", target / file)
    except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError and timeouts included
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {name} (offline?): put {' and '.join(PRESET_FILES)} from {page} "
                        f"into {target} [{reason}]") from None
    return target


def resolve_init(spec: str, expect: ModelConfig | None = None) -> tuple[ModelConfig, Params]:
    """`(ModelConfig, params)` for an `--init SPEC` (see the module docstring for the forms).

    With `expect`, the loaded params must have exactly `param_shapes(expect)`; a mismatch
    names the parameter and both shapes. The returned config is the checkpoint's own
    (for a run directory, its `model` section).
    """
    spec = str(spec).strip()
    if not spec:
        raise UserError(f"--init is empty; give {ACCEPTED}")
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.yaml").is_file():
            config, params = _load_run_dir(path)
        elif (path / "config.json").is_file():
            config, params = load_hf_dir(path)
        elif (path / "hparams.json").is_file():
            config, params = load_openai_dir(path)
        else:
            raise UserError(f"{path} holds neither config.yaml (jaxgpt run), config.json (Hugging Face "
                            f"GPT-2) nor hparams.json (OpenAI TensorFlow checkpoint)")
    elif spec in HF_PRESETS or spec in PRESET_ALIASES:
        config, params = load_hf_dir(download_preset(PRESET_ALIASES.get(spec, spec)))
    elif path.exists():
        raise UserError(f"--init {spec} is a file; give the directory that holds it ({ACCEPTED})")
    else:
        raise UserError(f"--init {spec}: no such directory or preset; give {ACCEPTED}")
    if expect is not None:
        check_params(params, expect, spec)
    return config, params


@dataclass(frozen=True)
class _ModelSection:
    """Only the `model` and `lora` sections of a run's config.yaml: a fine-tuning run's other
    sections (its own `data`, `train.epochs`, ...) are not pretraining's and need not load."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def _load_run_dir(path: Path) -> tuple[ModelConfig, Params]:
    try:
        from jaxgpt.checkpoint import load_params
    except ImportError:
        raise UserError(f"{path} is a jaxgpt run directory but jaxgpt.checkpoint.load_params is not "
                        "available in this install") from None
    config, params = load_params(path, config_cls=_ModelSection)
    if has_lora(params):  # a LoRA fine-tuning run: fold its adapters in with its own alpha
        params = merge_lora(params, config.lora)
    return config.model, params


def remove_preset(name: str) -> None:
    """Delete a cached preset (e.g. after a corrupt download)."""
    shutil.rmtree(preset_dir(PRESET_ALIASES.get(name, name)), ignore_errors=True)
