"""Hugging Face checkpoints in: a folder's config.json and weights -> `(ModelConfig, params)`.

The family is config.json's `model_type` (`jaxgpt.models`: gpt2, llama, qwen3, gemma3_text);
the family's converter maps each tensor's HF name to its jaxgpt path (a rename table, `Family.hf_target`,
with a transpose where HF stores `[out, in]`) and reads the config (`Family.config_from_hf`).
Any unknown, duplicate, missing or mis-shaped tensor is a one-line `UserError` naming it.
With tied embeddings the head is the token embedding itself: `lm_head.weight` must be absent
or equal to it. OpenAI's original TensorFlow checkpoints have their own names
(`jaxgpt.io.openai_tf`).

Memory: loaders stream, one tensor at a time from the memory-mapped file (shape-checked
before its data is read, converted to float32, moved to a jax array, its host copy dropped),
so peak host memory is one float32 set of params plus one tensor, never two copies of the
model. `pytorch_model.bin` is read with `torch.load(mmap=True, weights_only=True)`: nothing in
a pickle is ever executed. `jaxgpt.io.hub.resolve_init` is the one `--init SPEC` resolver;
`jaxgpt.io.hf_export.export_hf` writes the HF format back.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.models import FAMILY_MODULES, family_of, get_family, param_shapes
from jaxgpt.models.family import Family, Target

Params = dict[str, Any]
SCORE_KEY = "score.weight"  # every family's *ForSequenceClassification head, `[classes, d]`


def family_of_hf(hf: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family of a config.json dict (`model_type`; GPT-2 when it has none)."""
    model_type = hf.get("model_type", "gpt2")
    for name in FAMILY_MODULES:
        family = get_family(name)
        if model_type in (family.hf_model_type, *family.hf_model_types_read):
            return family
    known = [get_family(n) for n in FAMILY_MODULES]
    raise UserError(f"{where}: model_type is {model_type!r}; only {' / '.join(f.title for f in known)} "
                    f"(model_type {', '.join(f.hf_model_type for f in known)}) can be loaded")


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a Hugging Face config.json dict (its family's reader)."""
    return family_of_hf(hf, where).config_from_hf(hf, where)


def hf_class_labels(hf: Mapping[str, Any]) -> list[str] | None:
    """The class names, in id order, of a `*ForSequenceClassification` config.json (its `id2label`;
    transformers' default of two `LABEL_i`); None for a language model. Such a checkpoint holds
    `score.weight [classes, d]` in place of the LM head (jaxgpt's `score/kernel`)."""
    if not any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        return None
    id2label = {str(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    return [id2label.get(str(i), f"LABEL_{i}") for i in range(len(id2label) or 2)]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


# ---------------------------------------------------------------------------------------
# Streaming conversion


class Tensor(NamedTuple):
    """One checkpoint tensor, not yet read: `load()` returns it as a numpy-compatible array."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], Any]


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _target_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform == "T" and len(shape) == 2:
        return shape[::-1]
    if transform == "squeeze0" and len(shape) >= 1 and shape[0] == 1:
        return shape[1:]
    return shape


def _to_f32(array: Any, transform: str) -> np.ndarray:
    """float32, C-contiguous numpy in jaxgpt layout (bf16/f16 sources are upcast exactly)."""
    if hasattr(array, "detach"):  # torch tensor (pytorch_model.bin): numpy has no bfloat16
        import torch

        array = array.detach().to(torch.float32).numpy()
    a = np.asarray(array, dtype=np.float32)
    if transform == "T":
        a = a.T
    elif transform == "squeeze0":
        a = a.reshape(a.shape[1:])
    return np.ascontiguousarray(a)


def convert_tensors(
    tensors: Iterable[Tensor],
    config: ModelConfig,
    target: Callable[[str], Target | None] | None,
    source: str,
    num_classes: int = 0,
) -> Params:
    """Assemble jaxgpt params for `config` from a stream of checkpoint tensors.

    Each tensor is named-mapped by `target` (default: the config's family's `hf_target`),
    shape-checked against `param_shapes(config)` before it is read, read, converted to float32
    and put on the default device; the host copy is then dropped. Any unknown, duplicate,
    missing or mis-shaped tensor is a one-line `UserError` naming it (and both shapes). For
    tied configs an `lm_head.weight` is accepted only if it equals the token embedding.
    `num_classes` > 0: a classifier, `score.weight` in place of the LM head (`hf_class_labels`).
    """
    family = family_of(config)
    target = target or family.hf_target
    expected = traverse_util.flatten_dict(param_shapes(config, num_classes=num_classes))
    out: dict[tuple[str, ...], Any] = {}
    tied_head: np.ndarray | None = None
    for t in tensors:
        tgt = Target(("score", "kernel"), "T") if t.name == SCORE_KEY else target(t.name)
        if tgt is None:
            raise UserError(f"{source}: unexpected tensor {t.name} {_fmt(t.shape)} (not a {family.name} parameter)")
        if tgt.path is None:
            continue  # attention-mask buffer
        if tgt.path == ("lm_head", "kernel") and config.tie_embeddings:
            tied_head = _to_f32(t.load(), "")  # compared with wte once that is read
            continue
        name = "/".join(tgt.path)
        if tgt.path not in expected:
            raise UserError(f"{source}: unexpected tensor {t.name} {_fmt(t.shape)} ({name} is not in a model "
                            f"with n_layer={config.n_layer}, tie_embeddings={config.tie_embeddings})")
        if tgt.path in out:
            raise UserError(f"{source}: {name} is stored twice (second time as {t.name})")
        have, want = _target_shape(tuple(t.shape), tgt.transform), tuple(expected[tgt.path].shape)
        if have != want:
            raise UserError(f"{name}: checkpoint has {_fmt(have)}, model expects {_fmt(want)} ({source}: {t.name})")
        host = _to_f32(t.load(), tgt.transform)
        if host.shape != want:  # the reader disagreed with its own header
            raise UserError(f"{name}: checkpoint has {_fmt(host.shape)}, model expects {_fmt(want)} ({source}: {t.name})")
        out[tgt.path] = jnp.asarray(host)
        del host
    missing = [p for p in expected if p not in out]
    if missing:
        names = ", ".join("/".join(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{source}: missing tensor {names} (the checkpoint does not match its config: "
                        f"n_layer={config.n_layer}, tie_embeddings={config.tie_embeddings})")
    if tied_head is not None:
        embedding = out[(family.token_embedding, "embedding")]
        if tied_head.shape != embedding.shape or not np.array_equal(tied_head, np.asarray(embedding)):
            raise UserError(f"{source}: lm_head.weight differs from {family.token_embedding}.weight but the config ties them "
                            f"(tie_word_embeddings true); set it to false to load an untied head")
    return traverse_util.unflatten_dict(out)


def check_params(params: Params, config: ModelConfig, source: str = "params", num_classes: int = 0) -> None:
    """Raise a one-line `UserError` unless `params` has exactly `param_shapes(config, num_classes=...)`."""
    have = traverse_util.flatten_dict(params)
    want = traverse_util.flatten_dict(param_shapes(config, num_classes=num_classes))
    for path, spec in sorted(want.items(), key=lambda kv: (kv[0][:-1], kv[0][-1] == "bias")):
        name = "/".join(path)
        if path not in have:
            raise UserError(f"{source}: missing parameter {name} {_fmt(spec.shape)}")
        if tuple(have[path].shape) != tuple(spec.shape):
            raise UserError(f"{name}: checkpoint has {_fmt(have[path].shape)}, model expects {_fmt(spec.shape)}")
    extra = [p for p in have if p not in want]
    if extra:
        raise UserError(f"{source}: unexpected parameter {'/'.join(extra[0])} {_fmt(have[extra[0]].shape)}")


# ---------------------------------------------------------------------------------------
# Hugging Face loaders


def safetensors_tensors(files: list[Path]) -> Iterator[Tensor]:
    """Tensors of one or more .safetensors files, read one at a time from the mmap."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = sl.get_dtype()

                def load(key=key, dtype=dtype, file=file, f=f):
                    if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):  # numpy has no such dtype; jax does
                        with safe_open(str(file), framework="flax") as g:
                            return np.asarray(g.get_tensor(key).astype(jnp.float32))
                    return f.get_tensor(key)

                yield Tensor(key, tuple(sl.get_shape()), load)


def _torch_tensors(state_dict: Mapping[str, Any]) -> Iterator[Tensor]:
    for key, value in state_dict.items():
        yield Tensor(key, tuple(value.shape), lambda value=value: value)


def load_hf_state_dict(state_dict: Mapping[str, Any], hf_config: Mapping[str, Any] | Any,
                       source: str = "state dict") -> tuple[ModelConfig, Params]:
    """jaxgpt `(config, params)` from an in-memory HF state dict (torch tensors or numpy
    arrays) and its config (a config.json dict or a `transformers.PretrainedConfig`)."""
    if not isinstance(hf_config, Mapping):
        hf_config = hf_config.to_dict()
    config = config_from_hf(hf_config)
    classes = len(hf_class_labels(hf_config) or ())
    return config, convert_tensors(_torch_tensors(state_dict), config, None, source, classes)


def _load_torch_bin(bin_file: Path) -> Mapping[str, Any]:
    """A `pytorch_model.bin` state dict, read with `weights_only=True`: torch's restricted
    unpickler builds only tensors and plain containers, so no code in the file runs. Any
    failure (a pickle that asks for more, a truncated or corrupt file, a non-dict) is one
    line of ours naming the file."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols; we report below
            warnings.simplefilter("ignore")
            try:
                state = torch.load(bin_file, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:  # a pre-1.6 (non-zip) file cannot be memory-mapped: read it whole
                if "mmap can only be used" not in str(e):
                    raise
                state = torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message has terminal colours
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
            glob = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            what = (f"it asks to run {glob.group(1)}" if glob else
                    f"it is not plain tensors ({(detail.group(1) if detail else type(e).__name__)[:80].strip()})")
            raise UserError(f"refusing {bin_file}: {what}; it was read with torch.load(weights_only=True), so "
                            "nothing in it ran; use model.safetensors, or re-download the file") from None
        first = (text.strip().splitlines() or [""])[0]
        raise UserError(f"cannot read {bin_file}: not a readable torch checkpoint ({type(e).__name__}: "
                        f"{first[:120]}); re-download it or use model.safetensors") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise UserError(f"cannot read {bin_file}: it holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, Params]:
    """jaxgpt `(config, params)` from a Hugging Face model directory: config.json plus
    model.safetensors (or a sharded model.safetensors.index.json, or pytorch_model.bin when
    torch is installed)."""
    path = Path(path)
    hf = read_json(path / "config.json")
    config = config_from_hf(hf, str(path / "config.json"))
    classes = len(hf_class_labels(hf) or ())  # a classifier: its score head in place of the LM head
    if config.family != "gpt2" and (path / "tokenizer.json").is_file():  # GPT-2 keeps tiktoken
        config = dataclasses.replace(config, tokenizer=str(path.resolve()))
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise UserError(f"{index} lists {f.name}, which is not in {path}")
    else:
        files = []
    if files:
        try:
            return config, convert_tensors(safetensors_tensors(files), config, None, str(files[0]), classes)
        except UserError:
            raise
        except Exception as e:  # a truncated or corrupt file
            raise UserError(f"cannot read {files[0]}: {e}") from None
    bin_file = path / "pytorch_model.bin"
    if bin_file.is_file():
        try:
            import torch  # noqa: F401  (only to give a clear error when it is missing)
        except ImportError:
            raise UserError(f"{bin_file} needs torch to read (pip install torch), or convert it to "
                            "model.safetensors") from None
        state = _load_torch_bin(bin_file)
        return config, convert_tensors(_torch_tensors(state), config, None, str(bin_file), classes)
    raise UserError(f"{path} has config.json but no model.safetensors (or pytorch_model.bin) next to it")
