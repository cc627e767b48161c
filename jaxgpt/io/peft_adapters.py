"""LoRA adapters in PEFT's format, both ways: a LoRA run's adapters written as a PEFT adapter
folder (`python -m jaxgpt export --adapter`), and a PEFT adapter folder read as `--init`.

    export_adapter("runs/qwen-sft", "qwen-sft-adapter")   # adapter_config.json + adapter_model.safetensors

    base = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
    model = peft.PeftModel.from_pretrained(base, "qwen-sft-adapter")   # the run's model, unmerged

    config, params = load_adapter("some-peft-adapter")   # its base (adapter_config.json), adapters merged

PEFT's LoRA layer computes `y = W x + B(A(x)) * lora_alpha / r`, jaxgpt's `x @ W + (x @ lora_a)
@ lora_b * alpha / rank` (`jaxgpt.models.lora`), so an adapter is the same two matrices under
PEFT's names: `base_model.model.<HF module>.lora_A.weight = lora_a.T [r, in]` and
`.lora_B.weight = lora_b.T [out, r]`, the HF module being the one whose kernel the family's
rename table names (`Family.hf_key`); GPT-2's Conv1D layers are PEFT's `fan_in_fan_out`. The
adapter is a few MB where the merged model (`export --init RUN`) is the whole model.

A classifier's or reward model's adapters are a `SEQ_CLS` adapter: its `score` head is new, not
the base's, so it is saved whole (PEFT's `modules_to_save`: `base_model.model.score.weight
[classes, n_embd]`, its own adapter merged in), and `PeftModel.from_pretrained(
AutoModelForSequenceClassification.from_pretrained(base, num_labels=N), ADAPTER)` is the run's
classifier; read back (`load_adapter`, PEFT's own SEQ_CLS adapters too) it is a classifier again.
`lora.split_qkv`'s three adapters on one fused layer have no PEFT form: a one-line
error that says to export the merged model. PPO's value head is left out. The base is the run's
`finetune.init` (a preset or hub id as its hub repository, a folder as its path); a run started
from random weights has no base to adapt.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import yaml
from flax import traverse_util

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.io.hf_export import CRITIC, check_export_dir, write_folder, write_safetensors
from jaxgpt.models import family_of
from jaxgpt.models.lora import LORA_LEAVES, LoRAConfig, has_lora, merge_lora

Tensors = dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]
PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}
HEADS = ("score", CRITIC)  # not the base model's layers
SCORE = "base_model.model.score.weight"
SEQ_CLS_HEADS = {"classifier", "score", "pre_classifier"}  # PEFT's modules_to_save for SEQ_CLS: `score` here


def base_model_name(init: str) -> str:
    """`finetune.init` as PEFT's `base_model_name_or_path`: a preset's or hub id's repository,
    else the folder's absolute path."""
    from jaxgpt.io.hub import HF_ORG, HF_PRESETS, PRESET_ALIASES, REPO_PRESETS, is_hub_id

    name = PRESET_ALIASES.get(init, init)
    if name in HF_PRESETS:
        return f"{HF_ORG}/{name}"
    if name in REPO_PRESETS:
        return REPO_PRESETS[name]
    return init if is_hub_id(init) else str(Path(init).expanduser().absolute())


def adapter_tensors(params: Any, config: ModelConfig,
                    lora: LoRAConfig | None = None) -> tuple[Tensors, list[str], bool]:
    """`(tensors, modules, fan_in_fan_out)`: PEFT key -> (shape, load) for every adapter (float32,
    transposed to PEFT's `[r, in]` / `[out, r]`) and a classifier's whole `score` head (`lora`: the
    run's section, for its alpha), the HF names of the adapted modules, and whether their base
    weights are stored `[in, out]` (GPT-2's Conv1D)."""
    family = family_of(config)
    tensors: Tensors = {}
    modules, fan_in_fan_out = set(), False
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] not in LORA_LEAVES or path[0] in HEADS:
            continue
        if np.ndim(leaf) != 2:
            raise UserError("lora.split_qkv=true puts three adapters on the fused c_attn, which PEFT cannot hold; "
                            "export the merged model (without --adapter)")
        kernel_key, transposed = family.hf_key((*path[:-1], "kernel"))
        module = kernel_key.removesuffix(".weight")
        modules.add(module)
        fan_in_fan_out |= not transposed

        def load(leaf=leaf):
            return np.ascontiguousarray(np.asarray(jax.device_get(leaf), dtype=np.float32).T)

        tensors[f"base_model.model.{module}.{PEFT_NAMES[path[-1]]}.weight"] = (tuple(np.shape(leaf))[::-1], load)
    if "score" in params:  # a classifier's head, saved whole (`modules_to_save`), its adapter merged

        def score(head=params["score"]):
            kernel = merge_lora({"score": jax.device_get(head)}, lora)["score"]["kernel"]
            return np.ascontiguousarray(np.asarray(kernel, np.float32).T)

        tensors[SCORE] = (tuple(np.shape(params["score"]["kernel"]))[::-1], score)
    return dict(sorted(tensors.items())), sorted(modules), fan_in_fan_out


def target_modules(params: Any, config: ModelConfig, adapted: list[str]) -> list[str]:
    """PEFT's `target_modules`: the short names (`q_proj`) when the adapters cover every dense
    layer of those names, else the full module names (PEFT matches a name or a `.name` suffix)."""
    family = family_of(config)
    short = {m.rsplit(".", 1)[-1] for m in adapted}
    every = {family.hf_key(path)[0].removesuffix(".weight") for path in traverse_util.flatten_dict(params)
             if path[-1] == "kernel" and len(path) > 1 and path[-2] in short and path[0] not in HEADS}
    return sorted(short) if every == set(adapted) else adapted


def adapter_config(lora: LoRAConfig, base: str, targets: list[str], fan_in_fan_out: bool,
                   classifier: bool = False) -> dict[str, Any]:
    """PEFT's adapter_config.json for jaxgpt's plain LoRA (scale alpha / r, no dropout at inference);
    a classifier's is a SEQ_CLS adapter that saves its `score` head."""
    task = "SEQ_CLS" if classifier else "CAUSAL_LM"
    return {"peft_type": "LORA", "task_type": task, "base_model_name_or_path": base,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "target_modules": targets,
            "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False, "use_dora": False,
            "modules_to_save": ["score"] if classifier else None, "inference_mode": True, "revision": None}


def export_adapter(run_dir: str | Path, out_dir: str | Path, *, force: bool = False,
                   labels: list[str] | None = None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Write `run_dir`'s LoRA adapters into `out_dir` as PEFT's adapter_config.json and
    adapter_model.safetensors (renamed into place whole, as `export_hf` writes); returns the
    folder, the adapter config, and for a classifier what `AutoModelForSequenceClassification.
    from_pretrained(base, **kwargs)` needs to be its base (`num_labels`, `id2label` from `labels`,
    `pad_token_id`, as `export_hf` writes them; none of it is in adapter_config.json)."""
    from jaxgpt.io.checkpoint import load_params
    from jaxgpt.io.hub import ModelSection

    run = Path(run_dir).expanduser()
    if not (run / "config.yaml").is_file():
        raise UserError(f"--adapter exports a jaxgpt LoRA run's adapters: {run_dir} is no run directory "
                        "(no config.yaml)")
    out = check_export_dir(out_dir, force, source=run)
    finetune = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("finetune") or {}
    cfg, params = load_params(run, config_cls=ModelSection)
    if not has_lora(params):
        raise UserError(f"{run_dir} has no LoRA adapters (finetune.train_mode={finetune.get('train_mode', 'full')}): "
                        "export the model itself (without --adapter)")
    init = str(finetune.get("init") or "")
    if not init:
        raise UserError(f"{run_dir} was trained from random weights (finetune.init is empty): there is no base model "
                        "for an adapter; export the merged model (without --adapter)")
    tensors, modules, fan_in_fan_out = adapter_tensors(params, cfg.model, cfg.lora)
    peft_config = adapter_config(cfg.lora, base_model_name(init), target_modules(params, cfg.model, modules),
                                 fan_in_fan_out, classifier=SCORE in tensors)

    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        write_safetensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})

    head = {}
    if SCORE in tensors:
        from jaxgpt.io.hf_export import classifier_config, score_classes

        classes = score_classes(params)
        hf = classifier_config(cfg.model, classes, labels)
        head = {"num_labels": classes, "id2label": {int(i): n for i, n in hf["id2label"].items()},
                "pad_token_id": hf["pad_token_id"]}
    return write_folder(out, write), peft_config, head


# ---------------------------------------------------------------------------------------
# Reading a PEFT adapter (`--init ADAPTER_FOLDER`)


def is_adapter_folder(path: Path) -> bool:
    """A PEFT adapter folder (adapter_config.json), not a jaxgpt run (config.yaml) nor a model folder
    (config.json): what `--init` reads as an adapter (`jaxgpt.io.hub`)."""
    others = ("config.yaml", "config.json")
    return (path / "adapter_config.json").is_file() and not any((path / f).is_file() for f in others)


def load_adapter(folder: str | Path) -> tuple[ModelConfig, Any]:
    """`(config, params)` of a PEFT LoRA adapter folder: its base model
    (`base_model_name_or_path`, anything `--init` takes: a hub id, a folder, a preset) with the
    adapters merged into the kernels, `W += A.T @ B.T * lora_alpha / r` (`/ sqrt(r)` with
    rsLoRA), the function `PeftModel` computes. A classifier's (SEQ_CLS) adapter gives a
    classifier: its saved `score` head in place of the LM head. What a LoRA adapter may hold
    that jaxgpt's dense layers cannot take (DoRA, trained biases, other saved modules, embedding
    adapters, per-module alphas) is a one-line error."""
    from jaxgpt.io.hf_load import safetensors_tensors
    from jaxgpt.io.hub import resolve_init

    folder = Path(folder).expanduser()
    try:
        peft_config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {folder}/adapter_config.json: {e}") from None
    kind = peft_config.get("peft_type")
    if kind != "LORA":
        raise UserError(f"{folder} is a PEFT {kind} adapter; jaxgpt reads LoRA adapters only")
    classifier = peft_config.get("task_type") == "SEQ_CLS"
    unsupported = [k for k, ok in (("use_dora", False), ("bias", "none"), ("alpha_pattern", {}), ("rank_pattern", {}))
                   if peft_config.get(k, ok) not in (ok, None, [], {})]
    if set(peft_config.get("modules_to_save") or ()) - (SEQ_CLS_HEADS if classifier else set()):
        unsupported.append("modules_to_save")
    if unsupported:
        raise UserError(f"{folder}'s adapter sets {', '.join(unsupported)}, which jaxgpt's LoRA layers cannot hold")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has no adapter_model.safetensors (a .bin adapter: save it again with "
                        "safe_serialization=True)")
    base = str(peft_config.get("base_model_name_or_path") or "")
    if not base:
        raise UserError(f"{folder}/adapter_config.json names no base_model_name_or_path")
    config, params = resolve_init(base)
    r, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    scale = alpha / (r ** 0.5 if peft_config.get("use_rslora") else r)
    tensors = {t.name: np.asarray(t.load(), np.float32) for t in safetensors_tensors([weights])}  # bf16 too
    head = tensors.pop(SCORE, None)
    params = merge_adapter(params, config, tensors, scale, str(folder))
    return config, with_score_head(params, config, head, str(folder)) if classifier else params


def with_score_head(params: Any, config: ModelConfig, head: np.ndarray | None, where: str) -> Any:
    """A SEQ_CLS adapter's model: `params` with its saved `score.weight [classes, n_embd]` as
    `score/kernel [n_embd, classes]` and no LM head (what `*ForSequenceClassification` holds)."""
    if head is None:
        raise UserError(f"{where} is a classifier's adapter (SEQ_CLS) without its score head ({SCORE}); save it "
                        "with modules_to_save=['score']")
    if head.ndim != 2 or head.shape[1] != config.n_embd:
        raise UserError(f"{where}: its score head is {list(head.shape)}, not [classes, {config.n_embd}] for its base")
    dtype = np.asarray(jax.tree.leaves(params)[0]).dtype
    return {**{k: v for k, v in params.items() if k not in ("lm_head", "score")},
            "score": {"kernel": np.ascontiguousarray(head.T).astype(dtype)}}


def merge_adapter(params: Any, config: ModelConfig, tensors: dict[str, np.ndarray], scale: float,
                  where: str) -> Any:
    """`params` with each adapted kernel `W [in, out]` plus `A.T @ B.T * scale` (`A [r, in]`,
    `B [out, r]` under PEFT's `base_model.model.<module>.lora_A|B.weight` keys)."""
    family = family_of(config)
    flat = traverse_util.flatten_dict(params)
    by_module = {family.hf_key(path)[0].removesuffix(".weight"): path for path in flat
                 if path[-1] == "kernel" and path[0] not in HEADS}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        head, _, leaf = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not head or leaf not in ("A.weight", "B.weight"):
            raise UserError(f"{where}: adapter tensor {key} is not a LoRA A/B matrix of a linear layer")
        pairs.setdefault(head.removesuffix(".default"), {})[leaf[0]] = value
    for module, ab in sorted(pairs.items()):
        path = by_module.get(module)
        if path is None:
            raise UserError(f"{where}: the adapter adapts {module}, which the base model has no linear layer of")
        if set(ab) != {"A", "B"}:
            raise UserError(f"{where}: {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        kernel = np.asarray(jax.device_get(flat[path]), np.float32)
        a, b = np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32)
        if a.shape[1] != kernel.shape[0] or b.shape[0] != kernel.shape[1] or a.shape[0] != b.shape[1]:
            raise UserError(f"{where}: {module}'s adapter ({list(a.shape)}, {list(b.shape)}) does not fit its "
                            f"kernel {list(kernel.shape)}")
        flat[path] = (kernel + (a.T @ b.T) * scale).astype(np.asarray(flat[path]).dtype)
    return traverse_util.unflatten_dict(flat)
