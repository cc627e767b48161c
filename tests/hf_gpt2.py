"""Small random Hugging Face GPT-2 models for the weight tests (`test_weights.py`,
`test_hub_and_export.py`), saved by the tests themselves: nothing touches the network."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {
    # odd sizes: head_dim 16, vocab 257
    "odd": dict(vocab_size=257, n_positions=64, n_embd=48, n_layer=3, n_head=3),
    # untied head and a different LayerNorm epsilon
    "untied_eps": dict(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                       layer_norm_epsilon=1e-6, tie_word_embeddings=False),
    # many small heads, deeper
    "deep": dict(vocab_size=50, n_positions=56, n_embd=40, n_layer=4, n_head=5, layer_norm_epsilon=1e-6),
}


def make_hf_model(seed: int, **kw) -> GPT2LMHeadModel:
    """A random GPT-2 in eval mode with non-trivial weights: token embeddings std 0.3,
    position embeddings std 1 (so greedy decoding moves on instead of repeating one token),
    Conv1D std 0.1, biases std 0.1 and LayerNorm scales 1 +- 0.3, so logits spread over
    several units (far from uniform) and every parameter matters."""
    torch.manual_seed(seed)
    cfg = GPT2Config(bos_token_id=None, eos_token_id=None, **kw)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith(("transformer.ln_f", "ln_f")):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "wpe" in name:
                p.normal_(0.0, 1.0)
            elif "wte" in name or name == "lm_head.weight":
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def save_hf_models(tmp_path_factory) -> dict:
    """name -> (directory saved with save_pretrained, the torch model), one per `SHAPES`."""
    out = {}
    for i, (name, kw) in enumerate(SHAPES.items()):
        d = tmp_path_factory.mktemp(f"hf_{name}")
        model = make_hf_model(i, **kw)
        model.save_pretrained(d)
        out[name] = (d, model)
    return out


def hf_tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
