"""Export weights to a Hugging Face directory (`export_hf`); the command line is
`python -m jaxgpt export` (`jaxgpt.cli.export`).

The folder receives config.json and model.safetensors (the family's names and config,
`jaxgpt.models.family.Family`), loadable with `transformers.AutoModelForCausalLM.from_pretrained`;
a classifier or reward model (a `score` head) with `AutoModelForSequenceClassification`. The
export is written to a temporary directory and renamed into place, so an interrupted run
leaves no half-written OUTDIR; a non-empty OUTDIR is refused unless `force`, which replaces
only a previous export (a folder of config.json and model.safetensors alone), never the
working folder, a folder above it, or the source weights.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import traverse_util

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.io.files import disk_full_as
from jaxgpt.models.lora import has_lora
from jaxgpt.io.hf_load import SCORE_KEY, check_params
from jaxgpt.models import family_of
from jaxgpt.text.tokenizer import TOKENIZER_FILES

Params = dict[str, Any]
CRITIC = "value_head"  # PPO's value head: trains beside the policy, is not part of the model an export holds


def score_classes(params: Params) -> int:
    """The classes of a `score` head (a classifier's; 1: a reward model's); 0 for a language model."""
    score = params.get("score") if hasattr(params, "get") else None
    return int(np.shape(score["kernel"])[-1]) if score else 0


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers' `AutoModelForCausalLM.from_pretrained` accepts
    (the config's family's `config_to_hf`)."""
    return family_of(config).config_to_hf(config)


def hf_tensors(params: Params, config: ModelConfig) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """HF key -> (shape, load), in key order; `load()` gives that one tensor as float32,
    C-contiguous numpy (so a writer can hold one tensor at a time).

    Tied models store only the token embedding (as `save_pretrained` does; the head is re-tied
    on load). Untied models add `lm_head.weight` `[V, d]`; a classifier or reward model has
    `score.weight` `[classes, d]` instead (`*ForSequenceClassification`). PPO's value head is
    left out. Kernels HF stores as `[out, in]` are transposed (`Family.hf_key`); tensors HF
    expects that the family does not hold are zeros (`Family.hf_extra_tensors`: GPT-2's c_attn
    bias with `qkv_bias=False`, exactly the same function).
    """
    if has_lora(params):
        raise UserError("params hold LoRA adapters (lora_a/lora_b): merge them first with "
                        "jaxgpt.models.lora.merge_lora(params, run_config.lora) (--init RUN does this)")
    params = {k: v for k, v in params.items() if k != CRITIC}
    check_params(params, config, num_classes=score_classes(params))
    family = family_of(config)
    out: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        key, transpose = (SCORE_KEY, True) if path == ("score", "kernel") else family.hf_key(path)

        def load(value=value, transpose=transpose):
            a = np.asarray(jax.device_get(value), dtype=np.float32)
            return np.ascontiguousarray(a.T if transpose else a)

        shape = tuple(value.shape)[::-1] if transpose else tuple(value.shape)
        out[key] = (shape, load)
    for key, shape in family.hf_extra_tensors(config).items():
        out[key] = (shape, lambda shape=shape: np.zeros(shape, np.float32))
    return dict(sorted(out.items()))


def hf_state_dict(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """`hf_tensors`, all loaded: HF key -> float32 numpy array."""
    return {k: load() for k, (_, load) in hf_tensors(params, config).items()}


def write_safetensors(path: str | Path, tensors: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write float32 tensors in the safetensors format one at a time.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    byte offsets; padded with spaces to a multiple of 8) and the raw little-endian data in
    header order. Streaming it here, instead of `safetensors.numpy.save_file` (which first
    turns every array into `bytes`), keeps a 1558M export at one host tensor in flight.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for key, (shape, _) in tensors.items():
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, (shape, load) in tensors.items():
            a = np.ascontiguousarray(load(), dtype="<f4")
            if a.shape != tuple(shape):
                raise ValueError(f"{key}: shape {a.shape}, header says {tuple(shape)}")
            f.write(memoryview(a).cast("B"))
            del a


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a PEFT LoRA adapter (`jaxgpt.io.peft_adapters`)
EXPORT_FILES = frozenset({"config.json", "model.safetensors", *TOKENIZER_FILES, *ADAPTER_FILES})


def check_export_dir(out_dir: str | Path, force: bool = False, source: str | Path | None = None) -> Path:
    """The absolute export directory, or a one-line `UserError`; nothing is touched.

    A non-empty OUTDIR is refused unless `force`, and `force` replaces only a previous
    export: a folder holding nothing but config.json, model.safetensors and tokenizer files. Never the
    working folder or a folder above it, nor the `source` weights' folder or one above it.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not force:
        raise UserError(f"{out} is not empty; pass --force to replace it")
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"--to-hf {out_dir} is the working folder or holds it; --force would delete it: "
                        "give a folder of its own")
    if source is not None and Path(source).expanduser().exists():
        src = Path(source).expanduser().resolve()
        if real == src or real in src.parents:
            raise UserError(f"--to-hf {out_dir} is (or holds) the --init weights {source}; --force would "
                            "delete them: give another folder")
    other = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES or not p.is_file())
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise UserError(f"--to-hf {out_dir} holds files that are not a previous export ({shown}); --force "
                        "replaces only a folder of config.json and model.safetensors: give another folder")
    return out


def classifier_config(config: ModelConfig, classes: int, labels: Sequence[str] | None) -> dict[str, Any]:
    """What config.json adds for a `score` head: the `*ForSequenceClassification` class, the
    label names and the padding id.

    transformers reads the score at each row's last token that is not `pad_token_id`. A
    classifier reads it at a text's last token, rows right-padded: the same. A reward model
    reads it at the eos that ends each sequence; where that eos is also the padding (GPT-2's
    `<|endoftext|>`) config.json gets no `pad_token_id`, and transformers then scores the last
    token of one unpadded row at a time (it refuses a batch)."""
    from jaxgpt.text.tokenizer import tokenizer_of

    names = [str(n) for n in labels] if labels else [f"LABEL_{i}" for i in range(classes)]
    if len(names) != classes or len(set(names)) != classes:
        raise UserError(f"labels {names} do not name the {classes} classes of the score head once each")
    tok = tokenizer_of(config)
    return {"architectures": [family_of(config).hf_classifier],
            "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
            "pad_token_id": None if classes == 1 and tok.pad_id == tok.eos_id else tok.pad_id}


def export_hf(params: Params, model_config: ModelConfig, out_dir: str | Path, *, force: bool = False,
              labels: Sequence[str] | None = None) -> Path:
    """Write a Hugging Face model directory: config.json + model.safetensors, and the model's
    tokenizer files when it has its own (`model.tokenizer` a folder; its eos and bos ids go
    into config.json).

    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it; params with a `score`
    head (a classifier, `labels` its class names; a reward model) are written as the family's
    `*ForSequenceClassification` (`classifier_config`), which `AutoModelForSequenceClassification`
    loads. Files are written into a temporary sibling directory that is renamed into place, so
    an interrupted export (or a full disk: one `DiskFull` line) leaves nothing half-written
    at `out_dir`. A non-empty `out_dir` is refused unless
    `force`, in which case it is replaced as a whole, and only if it holds nothing but a
    previous export (`check_export_dir`). Host memory: one tensor at a time
    beyond the params themselves (see `write_safetensors`).
    """
    out = check_export_dir(out_dir, force)
    tensors = hf_tensors(params, model_config)
    return write_folder(out, lambda tmp: _write_export(tmp, params, model_config, tensors, labels))


def write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary sibling folder of `out`, then rename it into place
    (replacing what `check_export_dir` allowed), so an interrupted write or a full disk (one
    `DiskFull` line) leaves nothing half-written at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with disk_full_as("the export", out):  # one line (exit 2); the temporary folder goes below
            write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp made it private; an export is an ordinary folder
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_export(tmp: Path, params: Params, model_config: ModelConfig, tensors, labels) -> None:
    """config.json, model.safetensors and the tokenizer's files into the folder `tmp`."""
    hf_config = config_to_hf(model_config)
    if model_config.tokenizer != "gpt2":
        from jaxgpt.text.tokenizer import tokenizer_of

        tok = tokenizer_of(model_config)
        hf_config.update(eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
        for name in TOKENIZER_FILES:
            if (tok.folder / name).is_file():
                shutil.copyfile(tok.folder / name, tmp / name)
    if score_classes(params):
        hf_config.update(classifier_config(model_config, score_classes(params), labels))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
