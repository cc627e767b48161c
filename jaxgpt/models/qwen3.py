"""Qwen3 (`model.family: qwen3`): Llama's block (`jaxgpt.models.llama`) with RMSNorm on each
head's q and k before the rotary positions, and `head_dim` its own field (128 in every Qwen3,
whatever `hidden_size / num_attention_heads` is).

Parameter tree: Llama's plus `layers_{i}/self_attn/q_norm/scale [head_dim]` and
`.../k_norm/scale [head_dim]` (HF `model.layers.{i}.self_attn.q_norm.weight`, `k_norm`).
"""
from __future__ import annotations

from typing import Any, Mapping

from jaxgpt.errors import UserError
from jaxgpt.models.llama import Llama, LlamaFamily


class Qwen3(Llama):
    qk_norm = True


class Qwen3Family(LlamaFamily):
    name = "qwen3"
    title = "Qwen3"
    module = Qwen3
    hf_model_type = "qwen3"
    hf_architecture = "Qwen3ForCausalLM"
    hf_classifier = "Qwen3ForSequenceClassification"

    def config_from_hf(self, hf: Mapping[str, Any], where: str = "config.json"):
        """Llama's reader; Qwen3's sliding-window attention (`use_sliding_window`, off in every
        released Qwen3) is refused there."""
        if hf.get("layer_types") and any(t != "full_attention" for t in hf["layer_types"]):
            raise UserError(f"{where}: layer_types other than full_attention are not supported")
        return super().config_from_hf(hf, where)

    def config_to_hf(self, config) -> dict[str, Any]:
        out = super().config_to_hf(config)
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
        return out


FAMILY = Qwen3Family()

__all__ = ["FAMILY", "Qwen3", "Qwen3Family"]
