"""`--init SPEC`: the one resolver from a user's weight spec to `(ModelConfig, params)`.

Accepted forms, tried in this order:

1. a jaxgpt run directory (holds `config.yaml`): its latest checkpoint, through
   `jaxgpt.io.checkpoint.load_params`;
2. a Hugging Face model directory of a family jaxgpt has (GPT-2, Llama, Qwen3, Gemma 3: `config.json`
   plus `model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin`
   when torch is installed; its `tokenizer.json` becomes the model's tokenizer), or a PEFT LoRA
   adapter folder (`adapter_config.json`): its base model with the adapters merged
   (`jaxgpt.io.peft_adapters`);
3. OpenAI's original TensorFlow release directory (holds `hparams.json` and
   `model.ckpt.*`; needs TensorFlow);
4. a preset name: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (or jaxgpt's names for the
   same shapes, `gpt2-124m`, `gpt2-355m`, `gpt2-774m`, `gpt2-1558m`). Its config.json and
   model.safetensors are downloaded once from huggingface.co/openai-community/NAME into
   `$JAXGPT_CACHE/hf/NAME` (default `~/.cache/jaxgpt/hf/NAME`) and read from there after;
5. a hub id (`Qwen/Qwen3-0.6B`, `google/gemma-3-270m`) or a preset naming one
   (`REPO_PRESETS`: `qwen3-0.6b`, `llama-3.2-1b`, ...): downloaded once into the same cache,
   verified the same way (`jaxgpt.io.hub_repos`); gated repositories need `$HF_TOKEN`.

Preset downloads are pinned and verified (`PRESET_PINS`): each preset is fetched at a fixed
commit of its hub repository, never `main`, and every file is checked before it enters the
cache (`jaxgpt.io.download`): against the size and sha256 written here (gpt2), or against the
size and hash the hub's metadata API gives for that commit (the LFS sha256 of
model.safetensors, the git blob id of config.json). A partial or mismatched file is deleted
and fetched again once. `$JAXGPT_HF_ENDPOINT` replaces https://huggingface.co (a mirror).
What was verified is recorded beside the folder (`hf/NAME.verified.json`), so later runs
check the sizes without the network.
"""
from __future__ import annotations

import difflib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxgpt.config import ModelConfig
from jaxgpt.io.download import Expected, VerificationError, fetch_verified, file_matches, remove_if_empty, warn
from jaxgpt.errors import UserError
from jaxgpt.models.lora import LoRAConfig, has_lora, merge_lora
from jaxgpt.io.hf_load import check_params, load_hf_dir
from jaxgpt.io.hub_repos import REPO_ID, cache_root  # noqa: F401 - where they were, for callers
from jaxgpt.io.openai_tf import load_openai_dir

Params = dict[str, Any]

HF_ORG = "openai-community"
HF_BASE_URL = f"https://huggingface.co/{HF_ORG}"  # + /NAME/resolve/REVISION/FILE
HF_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


@dataclass(frozen=True)
class Pin:
    """A preset's hub commit, and (where known here) the size and sha256 of its files."""

    revision: str
    files: dict[str, Expected] = field(default_factory=dict)


# Commits of huggingface.co/openai-community/NAME. gpt2's hashes are pinned by value; the
# others are checked against the hub's metadata for the pinned commit at download time.
PRESET_PINS: dict[str, Pin] = {
    "gpt2": Pin("607a30d783dfa663caf39e06633721c8d4cfcd7e", {
        "config.json": Expected(665, sha256="0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4"),
        "model.safetensors": Expected(
            548_105_171, sha256="248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    }),
    "gpt2-medium": Pin("6dcaa7a952f72f9298047fd5137cd6e4f05f41da"),
    "gpt2-large": Pin("32b71b12589c2f8d625668d2335a01cac3249519"),
    "gpt2-xl": Pin("15ea56dee5df4983c59b2538573817e1667135e2"),
}
PRESET_ALIASES = {"gpt2-124m": "gpt2", "gpt2-355m": "gpt2-medium", "gpt2-774m": "gpt2-large",
                  "gpt2-1558m": "gpt2-xl"}
PRESET_FILES = ("config.json", "model.safetensors")
# Presets whose weights live in an organisation's repository (downloaded by `download_repo`).
REPO_PRESETS = {"llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
                "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "qwen3-0.6b": "Qwen/Qwen3-0.6B",
                "qwen3-1.7b": "Qwen/Qwen3-1.7B", "qwen3-4b": "Qwen/Qwen3-4B", "qwen3-8b": "Qwen/Qwen3-8B",
                "gemma-3-270m": "google/gemma-3-270m", "gemma-3-1b": "google/gemma-3-1b-pt",
                "gemma-3-4b": "google/gemma-3-4b-pt", "gemma-3-12b": "google/gemma-3-12b-pt",
                "gemma-3-27b": "google/gemma-3-27b-pt"}
ACCEPTED = ("a jaxgpt run directory (config.yaml + checkpoints/), a Hugging Face model directory "
            "(config.json + model.safetensors), a PEFT LoRA adapter directory (adapter_config.json), an OpenAI "
            "TensorFlow checkpoint directory (hparams.json + model.ckpt.*), a hub id such as Qwen/Qwen3-0.6B, "
            "or a preset: "
            + ", ".join((*HF_PRESETS, *REPO_PRESETS)))


def preset_dir(name: str) -> Path:
    return cache_root() / "hf" / name


def _base_url() -> str:
    """`$JAXGPT_HF_ENDPOINT/openai-community` when set (a mirror), else `HF_BASE_URL`."""
    endpoint = os.environ.get("JAXGPT_HF_ENDPOINT", "").rstrip("/")
    return f"{endpoint}/{HF_ORG}" if endpoint else HF_BASE_URL


def _record_path(name: str) -> Path:
    return cache_root() / "hf" / f"{name}.verified.json"


def _read_record(name: str) -> dict | None:
    try:
        return json.loads(_record_path(name).read_text())
    except (OSError, ValueError):
        return None


def _hub_expected(name: str, revision: str) -> dict[str, Expected]:
    """Size and hash of each preset file at `revision`, from the hub's model API
    (`/api/models/REPO/revision/REV?blobs=true`: an LFS file's sha256, else its git blob id)."""
    root = _base_url().rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{root}/api/models/{HF_ORG}/{name}/revision/{revision}?blobs=true",
                                timeout=60) as response:
        body = b""
        while (chunk := response.read(1 << 16)) and len(body) < 16 << 20:
            body += chunk
    info = json.loads(body.decode())
    siblings = {s.get("rfilename"): s for s in info.get("siblings", []) if isinstance(s, dict)}
    out = {}
    for file in PRESET_FILES:
        entry = siblings.get(file)
        if entry is None:
            raise VerificationError(f"the hub lists no {file} for {name} at {revision[:12]}")
        lfs = entry.get("lfs") or {}
        if lfs.get("sha256"):
            out[file] = Expected(int(lfs.get("size", entry.get("size"))), sha256=lfs["sha256"])
        elif entry.get("blobId") and entry.get("size") is not None:
            out[file] = Expected(int(entry["size"]), git_sha1=entry["blobId"])
        else:
            raise VerificationError(f"the hub gives no size and hash for {file} of {name}")
    return out


def _cached_and_recorded(name: str, target: Path, revision: str) -> bool:
    """The cache holds every file, recorded as verified at `revision`, at its recorded size."""
    record = _read_record(name)
    if not record or record.get("revision") != revision:
        return False
    files = record.get("files", {})
    for file in PRESET_FILES:
        path = target / file
        if not path.is_file() or file not in files or path.stat().st_size != files[file]["size"]:
            if path.is_file():
                warn(f"cached {file} of {name} is not the size it was verified at; deleted it, downloading it again")
                path.unlink()
            return False
    return True


def download_preset(name: str) -> Path:
    """The local directory of preset `name` (one of `HF_PRESETS`), downloading what is missing.

    Plain `urllib` from `HF_BASE_URL/NAME/resolve/REVISION/FILE`, verified as the module
    docstring says; offline (or any failure) is a one-line `UserError` saying which files to
    put where by hand.
    """
    target = preset_dir(name)
    pin = PRESET_PINS[name]
    if _cached_and_recorded(name, target, pin.revision):
        return target
    page = f"https://huggingface.co/{HF_ORG}/{name}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        try:
            expected = dict(pin.files) or _hub_expected(name, pin.revision)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
            if all((target / f).is_file() for f in PRESET_FILES):  # cached before downloads were verified
                warn(f"cannot verify the cached {name} against the hub (offline?); using {target} as it is")
                return target
            raise
        for file in PRESET_FILES:
            path = target / file
            if path.is_file():  # cached before downloads were verified: check it once
                problem = file_matches(path, expected[file])
                if problem is None:
                    continue
                warn(f"cached {file} of {name} {problem}; deleted it, downloading it again")
                path.unlink()
            fetch_verified(f"{_base_url()}/{name}/resolve/{pin.revision}/{file}", path, expected[file],
                           label=f"{file} of {name}")
        record = {"revision": pin.revision,
                  "files": {f: {"size": e.size, "sha256": e.sha256, "git_sha1": e.git_sha1} for f, e in expected.items()}}
        tmp = _record_path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, _record_path(name))
    except VerificationError as e:
        remove_if_empty(target)
        raise UserError(f"cannot download {name}: {e}; check the connection (or $JAXGPT_HF_ENDPOINT) and "
                        "try again") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # HTTPError, timeouts
        reason = getattr(e, "reason", None) or e
        remove_if_empty(target)
        raise UserError(f"cannot download {name} (offline?): put {' and '.join(PRESET_FILES)} from {page} "
                        f"into {target} (commit {pin.revision}) [{reason}]") from None
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
        config, params = _load_dir(path)
    elif spec in HF_PRESETS or spec in PRESET_ALIASES:
        config, params = load_hf_dir(download_preset(PRESET_ALIASES.get(spec, spec)))
    elif path.exists():
        raise UserError(f"--init {spec} is a file; give the directory that holds it ({ACCEPTED})")
    elif is_hub_id(spec):
        config, params = _load_dir(hub_folder(spec))  # a model's or a PEFT adapter's repository
    else:
        raise UserError(f"--init {spec}: no such directory or preset; give {ACCEPTED}")
    if expect is not None:
        check_params(params, expect, spec)
    return config, params


def _load_dir(path: Path) -> tuple[ModelConfig, Params]:
    if (path / "config.yaml").is_file():
        return _load_run_dir(path)
    if (path / "config.json").is_file():
        return load_hf_dir(path)
    from jaxgpt.io.peft_adapters import is_adapter_folder, load_adapter

    if is_adapter_folder(path):  # a PEFT LoRA adapter: its base, adapters merged
        return load_adapter(path)
    if (path / "hparams.json").is_file():
        return load_openai_dir(path)
    raise UserError(f"{path} holds neither config.yaml (jaxgpt run), config.json (Hugging Face model), "
                    "adapter_config.json (PEFT adapter) nor hparams.json (OpenAI TensorFlow checkpoint)")


def is_hub_id(spec: str) -> bool:
    """`ORG/NAME` (or a preset naming one) that is not a local path: `hub_folder` can fetch it."""
    return not Path(spec).expanduser().exists() and (spec in REPO_PRESETS or bool(REPO_ID.fullmatch(spec)))


def hub_folder(spec: str, flag: str = "--init") -> Path:
    """The local folder of hub repository `spec` (`ORG/NAME` or a `REPO_PRESETS` name),
    downloaded and verified once (`jaxgpt.io.hub_repos`). A spec whose parent is a local folder
    (`runs/typo`) that cannot be downloaded is "no such directory" with the closest name."""
    from jaxgpt.io.hub_repos import download_repo

    try:
        return download_repo(REPO_PRESETS.get(spec, spec))
    except UserError:  # `runs/typo`: an entry missing from a local folder, not a hub id
        path = Path(spec).expanduser()
        if spec not in REPO_PRESETS and path.parent.is_dir():
            raise UserError(f"{flag} {spec}: no such directory{missing_entry_hint(path)} (nor a hub "
                            f"repository that could be downloaded)") from None
        raise


def local_folder(spec: str | Path, flag: str = "--init") -> Path:
    """`spec` as a local path: a hub id downloaded (`hub_folder`), anything else as it is (the
    caller says what it lacks)."""
    return hub_folder(str(spec), flag) if is_hub_id(str(spec)) else Path(spec).expanduser()


def missing_entry_hint(path: Path) -> str:
    """` (did you mean runs/train-1?)`, or what the existing `path.parent` holds."""
    names = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
    close = difflib.get_close_matches(path.name, names, n=1)
    if close:
        return f" (did you mean {path.parent / close[0]}?)"
    if not names:
        return f" ({path.parent}/ holds no folders)"
    return f" ({path.parent}/ holds {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


@dataclass(frozen=True)
class ModelSection:
    """Only the `model` and `lora` sections of a run's config.yaml: a fine-tuning run's other
    sections (its own `data`, `train.epochs`, ...) are not pretraining's and need not load."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def _load_run_dir(path: Path) -> tuple[ModelConfig, Params]:
    try:
        from jaxgpt.io.checkpoint import load_params
    except ImportError:
        raise UserError(f"{path} is a jaxgpt run directory but jaxgpt.io.checkpoint.load_params is not "
                        "available in this install") from None
    config, params = load_params(path, config_cls=ModelSection)
    if has_lora(params):  # a LoRA fine-tuning run: fold its adapters in with its own alpha
        params = merge_lora(params, config.lora)
    return config.model, params
