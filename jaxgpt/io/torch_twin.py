"""A PyTorch twin of a jaxgpt model: its family's transformers model (GPT-2: `GPT2LMHeadModel`)
with the same weights, plus `torch.optim.AdamW` set up like `jaxgpt.train.optim.make_optimizer`.

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
from jaxgpt.io.hf_load import Tensor, convert_tensors
from jaxgpt.models import family_of, family_of_params

Params = dict[str, Any]


def hf_config(config: ModelConfig, attn_implementation: str = "eager"):
    """The transformers config of `config` (its family's `config_to_hf`; GPT-2's three
    dropouts = `config.dropout`).

    `eager` attention is the plain softmax(QK^T/sqrt(d) + mask) V that jaxgpt's reference
    attention also computes; `sdpa` is faster on CPU for large shapes.
    """
    return family_of(config).torch_config(config, attn_implementation)


def to_torch(params: Params, config: ModelConfig, *, attn_implementation: str = "eager"):
    """A float32 transformers model (eval mode; GPT-2: `GPT2LMHeadModel`) holding `params`;
    `[batch, seq]` token ids in, `.logits` `[batch, seq, vocab]` out. Tensors HF has that the
    family does not (GPT-2's c_attn bias with `qkv_bias=False`) are zero and frozen."""
    import torch

    from jaxgpt.io.hf_export import hf_state_dict

    family = family_of(config)
    model = family.torch_model(config, attn_implementation)
    state = {k: torch.tensor(v) for k, v in hf_state_dict(params, config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied model's lm_head.weight is the token embedding itself; nothing else may be left unset.
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"torch twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    frozen = set(family.hf_extra_tensors(config))
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return model.eval()


def from_torch(model, config: ModelConfig) -> Params:
    """jaxgpt params of `config` from its transformers twin (e.g. after torch training).

    Tensors the family does not hold (GPT-2's c_attn bias with `qkv_bias=False`) must still
    be zero (else the two models would compute different functions) and are dropped."""
    extra = set(family_of(config).hf_extra_tensors(config))
    tensors = []
    for key, value in model.state_dict().items():
        if key in extra:
            if bool(value.detach().abs().max() > 0):
                raise UserError(f"torch twin: {key} is not zero, but model.qkv_bias is false")
            continue
        if config.tie_embeddings and key == "lm_head.weight":
            continue  # the tied head is the token embedding
        tensors.append(Tensor(key, tuple(value.shape), lambda v=value: v.detach().cpu()))
    return convert_tensors(tensors, config, None, "torch twin")


def decay_names(params: Params, config: ModelConfig | None = None) -> set[str]:
    """HF names of the parameters `jaxgpt.train.optim.decay_mask` decays (matrices and
    embeddings); `config` names the family (default: the one whose names `params` have)."""
    from jaxgpt.train.optim import decay_mask

    family = family_of(config) if config is not None else family_of_params(params)
    flat = traverse_util.flatten_dict(decay_mask(params))
    return {family.hf_key(path)[0] for path, decays in flat.items() if decays}


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
