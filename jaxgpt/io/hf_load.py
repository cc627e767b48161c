"""Convert GPT-2 weights between jaxgpt and Hugging Face / OpenAI checkpoints.

jaxgpt's parameter names are GPT-2's (see `jaxgpt.models.gpt2`), so conversion is a rename:

    HF key (with or without `transformer.`)     jaxgpt path                shape
    wte.weight                                   wte/embedding              [V, d]
    wpe.weight                                   wpe/embedding              [ctx, d]
    h.{i}.ln_1.weight | .bias                    h_{i}/ln_1/scale | bias    [d]
    h.{i}.attn.c_attn.weight | .bias             h_{i}/attn/c_attn/kernel   [d, 3d] | [3d]
    h.{i}.attn.c_proj.weight | .bias             h_{i}/attn/c_proj/kernel   [d, d] | [d]
    h.{i}.ln_2.weight | .bias                    h_{i}/ln_2/scale | bias    [d]
    h.{i}.mlp.c_fc.weight | .bias                h_{i}/mlp/c_fc/kernel      [d, 4d] | [4d]
    h.{i}.mlp.c_proj.weight | .bias              h_{i}/mlp/c_proj/kernel    [4d, d] | [d]
    ln_f.weight | .bias                          ln_f/scale | bias          [d]
    lm_head.weight                               lm_head/kernel (transposed) [V, d] -> [d, V]

GPT-2's `Conv1D` stores its weight as `[in, out]` (it computes `x @ W + b`), which is
already flax's `Dense` kernel layout, so no transpose is needed except for `lm_head`, an
`nn.Linear` (`[out, in]`). The fused `c_attn` keeps q|k|v concatenated along the output
axis in that order in both. The `attn.bias` / `attn.masked_bias` entries of older
checkpoints are causal-mask buffers, not parameters, and are skipped. With tied embeddings
the head is `wte` itself: `lm_head.weight` must be absent or equal to `wte.weight`.

OpenAI's original TensorFlow checkpoints have their own names (`jaxgpt.io.openai_tf`).

Memory: loaders stream, one tensor at a time from the memory-mapped file (shape-checked
before its data is read, converted to float32, moved to a jax array, its host copy dropped),
so peak host memory is one float32 set of params plus one tensor, never two copies of a
1558M model. `pytorch_model.bin` is read with `torch.load(mmap=True, weights_only=True)`:
nothing in a pickle is ever executed. `jaxgpt.io.hub.resolve_init` is the one `--init SPEC`
resolver; `jaxgpt.io.hf_export.export_hf` writes the HF format back.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.models.gpt2 import param_shapes

Params = dict[str, Any]

# ---------------------------------------------------------------------------------------
# Configs

#: GPT2Config defaults used for keys a config.json leaves out (never the shape keys).
HF_DEFAULTS: dict[str, Any] = {
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "n_inner": None,
}
# Both names denote the same tanh approximation of GELU that jaxgpt's MLP computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_SHAPE_KEYS = {  # ModelConfig field -> accepted config.json keys, first preferred
    "vocab_size": ("vocab_size",),
    "context_length": ("n_positions", "max_position_embeddings", "n_ctx"),
    "n_embd": ("n_embd", "hidden_size"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
}


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a Hugging Face GPT-2 config.json dict.

    Shapes (`vocab_size`, `n_positions` -> `context_length`, `n_embd`, `n_layer`, `n_head`)
    must be present; other keys default as in `transformers.GPT2Config`. Options that
    jaxgpt's model does not implement raise `UserError` rather than load a model that would
    silently compute something else.
    """
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"{where}: model_type is {model_type!r}; only GPT-2 (model_type gpt2) can be loaded")
    shape = {}
    for field, keys in _SHAPE_KEYS.items():
        found = [k for k in keys if hf.get(k) is not None]
        if not found:
            raise UserError(f"{where}: missing {keys[0]}")
        value = hf[found[0]]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{where}: {found[0]} must be a positive integer, got {value!r}")
        shape[field] = value
    if shape["n_embd"] % shape["n_head"]:
        raise UserError(f"{where}: n_embd ({shape['n_embd']}) is not divisible by n_head ({shape['n_head']})")
    get = lambda k: hf[k] if hf.get(k) is not None else HF_DEFAULTS[k]
    act = get("activation_function")
    if act not in _TANH_GELUS:
        raise UserError(f"{where}: activation_function is {act!r}; jaxgpt's GPT-2 MLP computes gelu_new")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * shape["n_embd"]:
        raise UserError(f"{where}: n_inner is {n_inner}; jaxgpt's MLP width is 4 * n_embd = {4 * shape['n_embd']}")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False)):
        if bool(get(key)) != supported:
            raise UserError(f"{where}: {key}={get(key)} is not supported (jaxgpt implements {key}={supported})")
    return ModelConfig(
        **shape,
        dropout=float(get("resid_pdrop")),
        qkv_bias=True,  # HF GPT-2 always has a c_attn bias
        tie_embeddings=bool(get("tie_word_embeddings")),
        layer_norm_epsilon=float(get("layer_norm_epsilon")),
    )


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
# Names


class Target(NamedTuple):
    """Where a checkpoint tensor goes: a jaxgpt param path, or `None` to skip it."""

    path: tuple[str, ...] | None
    transform: str = ""  # "" | "T" (transpose [out, in] -> [in, out]) | "squeeze0" (drop a leading 1)


_HF_LAYER = re.compile(r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)")
_HF_BUFFER = re.compile(r"h\.\d+\.(attn|crossattention)\.(bias|masked_bias)")


def hf_target(key: str) -> Target | None:
    """Map a HF GPT-2 state-dict key to its jaxgpt path; `None` if it is not GPT-2's."""
    name = key[len("transformer."):] if key.startswith("transformer.") else key
    if name in ("wte.weight", "wpe.weight"):
        return Target((name.split(".")[0], "embedding"))
    if name in ("ln_f.weight", "ln_f.bias"):
        return Target(("ln_f", "scale" if name.endswith("weight") else "bias"))
    if key == "lm_head.weight":
        return Target(("lm_head", "kernel"), "T")
    if _HF_BUFFER.fullmatch(name):
        return Target(None)
    m = _HF_LAYER.fullmatch(name)
    if m is None:
        return None
    layer, module, kind = m.groups()
    leaf = ("scale" if kind == "weight" else "bias") if module.startswith("ln") else (
        "kernel" if kind == "weight" else "bias")
    return Target((f"h_{layer}", *module.split("."), leaf))


def hf_key(path: tuple[str, ...], prefix: str = "transformer.") -> str:
    """The HF key of a jaxgpt param path (inverse of `hf_target`)."""
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    if path[0] in ("wte", "wpe"):
        return f"{prefix}{path[0]}.weight"
    leaf = {"scale": "weight", "kernel": "weight", "bias": "bias"}[path[-1]]
    if path[0] == "ln_f":
        return f"{prefix}ln_f.{leaf}"
    layer = path[0].removeprefix("h_")
    return f"{prefix}h.{layer}.{'.'.join(path[1:-1])}.{leaf}"


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
    target: Callable[[str], Target | None],
    source: str,
) -> Params:
    """Assemble jaxgpt params for `config` from a stream of checkpoint tensors.

    Each tensor is named-mapped by `target`, shape-checked against `param_shapes(config)`
    before it is read, read, converted to float32 and put on the default device; the host
    copy is then dropped. Any unknown, duplicate, missing or mis-shaped tensor is a one-line
    `UserError` naming it (and both shapes). For tied configs an `lm_head.weight` is
    accepted only if it equals `wte`.
    """
    expected = traverse_util.flatten_dict(param_shapes(config))
    out: dict[tuple[str, ...], jax.Array] = {}
    tied_head: np.ndarray | None = None
    for t in tensors:
        tgt = target(t.name)
        if tgt is None:
            raise UserError(f"{source}: unexpected tensor {t.name} {_fmt(t.shape)} (not a GPT-2 parameter)")
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
        wte = out[("wte", "embedding")]
        head = tied_head
        if head.shape != wte.shape or not np.array_equal(head, np.asarray(wte)):
            raise UserError(f"{source}: lm_head.weight differs from wte.weight but the config ties them "
                            f"(tie_word_embeddings true); set it to false to load an untied head")
    return traverse_util.unflatten_dict(out)


def check_params(params: Params, config: ModelConfig, source: str = "params") -> None:
    """Raise a one-line `UserError` unless `params` has exactly `param_shapes(config)`."""
    have = traverse_util.flatten_dict(params)
    want = traverse_util.flatten_dict(param_shapes(config))
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


def _safetensors_tensors(files: list[Path]) -> Iterator[Tensor]:
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
    """jaxgpt `(config, params)` from an in-memory HF GPT-2 state dict (torch tensors or
    numpy arrays) and its config (a config.json dict or a `transformers.GPT2Config`)."""
    if not isinstance(hf_config, Mapping):
        hf_config = hf_config.to_dict()
    config = config_from_hf(hf_config)
    return config, convert_tensors(_torch_tensors(state_dict), config, hf_target, source)


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
    """jaxgpt `(config, params)` from a HF GPT-2 directory: config.json plus
    model.safetensors (or a sharded model.safetensors.index.json, or pytorch_model.bin when
    torch is installed)."""
    path = Path(path)
    config = config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
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
            return config, convert_tensors(_safetensors_tensors(files), config, hf_target, str(files[0]))
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
        return config, convert_tensors(_torch_tensors(state), config, hf_target, str(bin_file))
    raise UserError(f"{path} has config.json but no model.safetensors (or pytorch_model.bin) next to it")


# ---------------------------------------------------------------------------------------
# Counting


def num_params_hf(config: ModelConfig) -> int:
    """Parameter count by arithmetic (as HF counts it: the tied head counted once)."""
    d, V, L = config.n_embd, config.vocab_size, config.n_layer
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    head = 0 if config.tie_embeddings else V * d
    return V * d + config.context_length * d + L * block + 2 * d + head
