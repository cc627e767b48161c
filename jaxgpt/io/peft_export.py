"""A LoRA run's adapters as a PEFT adapter folder (`python -m jaxgpt export --adapter`).

    export_adapter("runs/qwen-sft", "qwen-sft-adapter")   # adapter_config.json + adapter_model.safetensors

    base = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
    model = peft.PeftModel.from_pretrained(base, "qwen-sft-adapter")   # the run's model, unmerged

PEFT's LoRA layer computes `y = W x + B(A(x)) * lora_alpha / r`, jaxgpt's `x @ W + (x @ lora_a)
@ lora_b * alpha / rank` (`jaxgpt.models.lora`), so an adapter is the same two matrices under
PEFT's names: `base_model.model.<HF module>.lora_A.weight = lora_a.T [r, in]` and
`.lora_B.weight = lora_b.T [out, r]`, the HF module being the one whose kernel the family's
rename table names (`Family.hf_key`); GPT-2's Conv1D layers are PEFT's `fan_in_fan_out`. The
adapter is a few MB where the merged model (`export --init RUN`) is the whole model.

Only a language model's adapters are PEFT adapters: a classifier's or reward model's `score`
head is new, not the base's, and `lora.split_qkv`'s three adapters on one fused layer have no
PEFT form; both are one-line errors that say to export the merged model. The base is the run's
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
from jaxgpt.models.lora import LORA_LEAVES, LoRAConfig, has_lora

Tensors = dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]
PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}


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


def adapter_tensors(params: Any, config: ModelConfig) -> tuple[Tensors, list[str], bool]:
    """`(tensors, modules, fan_in_fan_out)`: PEFT key -> (shape, load) for every adapter (float32,
    transposed to PEFT's `[r, in]` / `[out, r]`), the HF names of the adapted modules, and whether
    their base weights are stored `[in, out]` (GPT-2's Conv1D)."""
    family = family_of(config)
    tensors: Tensors = {}
    modules, fan_in_fan_out = set(), False
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] not in LORA_LEAVES or path[0] == CRITIC:
            continue
        if path[0] == "score":
            raise UserError("the run is a classifier or reward model: its score head is not part of a base model, so "
                            "its adapters are no PEFT adapter for one; export the merged model (without --adapter)")
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
    return dict(sorted(tensors.items())), sorted(modules), fan_in_fan_out


def target_modules(params: Any, config: ModelConfig, adapted: list[str]) -> list[str]:
    """PEFT's `target_modules`: the short names (`q_proj`) when the adapters cover every dense
    layer of those names, else the full module names (PEFT matches a name or a `.name` suffix)."""
    family = family_of(config)
    short = {m.rsplit(".", 1)[-1] for m in adapted}
    every = {family.hf_key(path)[0].removesuffix(".weight") for path in traverse_util.flatten_dict(params)
             if path[-1] == "kernel" and len(path) > 1 and path[-2] in short and path[0] not in ("score", CRITIC)}
    return sorted(short) if every == set(adapted) else adapted


def adapter_config(config: ModelConfig, lora: LoRAConfig, base: str, targets: list[str],
                   fan_in_fan_out: bool) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "target_modules": targets,
            "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "inference_mode": True, "revision": None}


def export_adapter(run_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> tuple[Path, dict[str, Any]]:
    """Write `run_dir`'s LoRA adapters into `out_dir` as PEFT's adapter_config.json and
    adapter_model.safetensors (renamed into place whole, as `export_hf` writes); returns the
    folder and the adapter config."""
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
    tensors, modules, fan_in_fan_out = adapter_tensors(params, cfg.model)
    peft_config = adapter_config(cfg.model, cfg.lora, base_model_name(init),
                                 target_modules(params, cfg.model, modules), fan_in_fan_out)

    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        write_safetensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})

    return write_folder(out, write), peft_config
