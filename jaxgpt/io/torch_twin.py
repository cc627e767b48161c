"""A PyTorch twin of a jaxgpt model: Hugging Face `GPT2LMHeadModel` with the same weights,
plus `torch.optim.AdamW` set up like `jaxgpt.train.optim.make_optimizer`.

This is the reference that training parity is checked against (`tests/test_parity.py`,
`benchmarks/parity_124m.py`): a torch implementation that jaxgpt did not write, fed the
same weights and batches, must give the same logits and, step after step, the same losses.

    model = to_torch(params, config)               # jaxgpt -> torch (eval mode)
    params = from_torch(model, config)             # torch -> jaxgpt
    opt = torch_adamw(model, params, train_cfg)    # decay on exactly jaxgpt's decay set
    loss = torch_lm_loss(model, inputs, targets)   # mean next-token CE, [batch, seq] ints

Names go through `jaxgpt.io.hf_load` / `jaxgpt.io.hf_export` (one rename table for the whole
project). HF GPT-2 always has a qkv bias; for a `qkv_bias=False` config (the book's model)
it is set to zero and frozen (`requires_grad=False`, left out of the optimiser), which is
exactly the same function and the same training dynamics. torch is imported lazily, so
this module costs nothing unless it is used.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.errors import UserError
from jaxgpt.io.hf_load import Tensor, convert_tensors, hf_key, hf_target

Params = dict[str, Any]
_QKV_BIAS = ".attn.c_attn.bias"


def hf_config(config: ModelConfig, attn_implementation: str = "eager"):
    """`transformers.GPT2Config` of `config` (all three dropouts = `config.dropout`).

    `eager` attention is the plain softmax(QK^T/sqrt(d) + mask) V that jaxgpt's reference
    attention also computes; `sdpa` is faster on CPU for large shapes.
    """
    from transformers import GPT2Config

    from jaxgpt.io.hf_export import config_to_hf

    cfg = GPT2Config(**{k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "dtype")})
    cfg._attn_implementation = attn_implementation
    return cfg


def to_torch(params: Params, config: ModelConfig, *, attn_implementation: str = "eager"):
    """A float32 `GPT2LMHeadModel` (eval mode) holding `params`; `[batch, seq]` token ids
    in, `.logits` `[batch, seq, vocab]` out. With `qkv_bias=False` the c_attn biases are
    zero and frozen."""
    import torch
    from transformers import GPT2LMHeadModel

    from jaxgpt.io.hf_export import hf_state_dict

    model = GPT2LMHeadModel(hf_config(config, attn_implementation)).to(torch.float32)
    state = {k: torch.tensor(v) for k, v in hf_state_dict(params, config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied model's lm_head.weight is wte itself; nothing else may be left unset.
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"torch twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if not config.qkv_bias:
        for name, p in model.named_parameters():
            if name.endswith(_QKV_BIAS):
                p.requires_grad_(False)
    return model.eval()


def from_torch(model, config: ModelConfig) -> Params:
    """jaxgpt params of `config` from a `GPT2LMHeadModel` (e.g. after torch training).

    With `qkv_bias=False` the c_attn biases must still be zero (else the two models would
    compute different functions) and are dropped."""
    tensors = []
    for key, value in model.state_dict().items():
        if key.endswith(_QKV_BIAS) and not config.qkv_bias:
            if bool(value.detach().abs().max() > 0):
                raise UserError(f"torch twin: {key} is not zero, but model.qkv_bias is false")
            continue
        if config.tie_embeddings and key == "lm_head.weight":
            continue  # the tied head is wte
        tensors.append(Tensor(key, tuple(value.shape), lambda v=value: v.detach().cpu()))
    return convert_tensors(tensors, config, hf_target, "torch twin")


def decay_names(params: Params) -> set[str]:
    """HF names of the parameters `jaxgpt.train.optim.decay_mask` decays (matrices and embeddings)."""
    from jaxgpt.train.optim import decay_mask

    flat = traverse_util.flatten_dict(decay_mask(params))
    return {hf_key(path) for path, decays in flat.items() if decays}


def torch_adamw(model, params: Params, train: TrainConfig, decay: set[str] | None = None):
    """`torch.optim.AdamW` with jaxgpt's hyper-parameters: `train.lr` (constant: the
    caller must use warmup 0 and min_lr_ratio 1 on the jaxgpt side), betas `(b1, b2)`,
    eps 1e-8 (optax's default), `train.weight_decay` on `decay` (default: `decay_names`,
    jaxgpt's decay set) and 0 on the other trainable parameters. No clipping.
    """
    import torch

    decay = decay_names(params) if decay is None else decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = decay - {n for n, _ in named}
    if unknown:
        raise UserError(f"torch twin: decay names not in the model: {sorted(unknown)[:3]}")
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": train.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.b1, train.b2), eps=1e-8)


def torch_lm_loss(model, inputs, targets):
    """Mean next-token cross-entropy of `model` on `inputs`/`targets` `[batch, seq]` (numpy
    or torch ints), as a torch scalar: the book's `calc_loss_batch`."""
    import torch

    inputs, targets = (torch.as_tensor(np.asarray(a), dtype=torch.long) for a in (inputs, targets))
    logits = model(inputs).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def numpy_params(params: Params) -> Params:
    """Host float32 copies of `params` (for comparing two param trees leaf by leaf)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
