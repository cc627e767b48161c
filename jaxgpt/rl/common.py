"""What `finetune.py grpo` and `finetune.py ppo` share: the rollout config section, the
policy / reference set-up (with `--init`, train modes and resume), prompt padding, and
chunked generation for evaluation.

The reference model is the policy's starting point (`--init`, or the seeded random init),
rebuilt the same way on `--resume` rather than stored in every checkpoint. It is frozen: a
plain params pytree passed explicitly to the jitted functions that score rollouts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np

from jaxgpt.errors import UserError


@dataclass(frozen=True)
class RolloutConfig:
    """`rollout` section: how experience is sampled and how often it is reused."""

    prompts_per_step: int = 16  # prompts per iteration (GRPO samples group_size completions of each)
    max_new_tokens: int = 16  # completion budget; prompt + completion must fit the context
    temperature: float = 1.0  # sampling temperature (> 0); the losses score the tempered policy that sampled
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    sampler: str = "inverse_cdf"  # inverse_cdf (exact, fast on CPU) | gumbel (jax.random.categorical)
    inner_epochs: int = 1  # passes over each experience batch (mu)
    minibatches: int = 1  # optimiser updates per pass
    eval_batch_size: int = 100  # prompts per greedy evaluation call


def validate_rollout(r: RolloutConfig, rows: int, devices: int, accum: int) -> None:
    """Range checks, and that each minibatch of `rows` sequences splits over devices x accum."""
    for name in ("prompts_per_step", "max_new_tokens", "inner_epochs", "minibatches", "eval_batch_size"):
        if getattr(r, name) < 1:
            raise UserError(f"rollout.{name} must be >= 1, got {getattr(r, name)}")
    if not r.temperature > 0:
        raise UserError(f"rollout.temperature must be > 0 (RL needs sampled completions), got {r.temperature}")
    from jaxgpt.sampling import SAMPLERS

    if r.sampler not in SAMPLERS:
        raise UserError(f"rollout.sampler must be one of {', '.join(SAMPLERS)}, got {r.sampler!r}")
    if r.top_k < 0:
        raise UserError(f"rollout.top_k must be >= 0 (0 = off), got {r.top_k}")
    if not 0.0 < r.top_p <= 1.0:
        raise UserError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if rows % r.minibatches:
        raise UserError(f"{rows} sequences per iteration do not split into rollout.minibatches={r.minibatches}")
    per = rows // r.minibatches
    if per % (devices * accum):
        raise UserError(f"a minibatch of {per} sequences must be divisible by devices x train.grad_accum_steps "
                        f"= {devices} x {accum}; change rollout.prompts_per_step, rollout.minibatches or "
                        "train.num_devices")


def sampling_kwargs(r: RolloutConfig) -> dict:
    return {"temperature": r.temperature, "top_k": r.top_k or None, "top_p": r.top_p if r.top_p < 1.0 else None,
            "method": r.sampler}


def prompt_arrays(prompts: Sequence[Sequence[int]], *, max_prompt_tokens: int, max_new_tokens: int,
                  context_length: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(tokens [n, P], mask [n, P], kept)`: the prompts left-padded to one length P (one
    compilation for every rollout), and the indices of the prompts kept.

    max_prompt_tokens > 0 drops longer prompts and sets P; 0 keeps all, P = the longest."""
    from jaxgpt.rl.rollout import pad_prompt_batch

    lengths = np.array([len(p) for p in prompts])
    kept = np.flatnonzero(lengths <= max_prompt_tokens) if max_prompt_tokens > 0 else np.arange(len(prompts))
    if len(kept) == 0:
        raise UserError(f"every {what} prompt is longer than data.max_prompt_tokens={max_prompt_tokens} "
                        f"(shortest: {lengths.min()} tokens); raise it")
    p = max_prompt_tokens if max_prompt_tokens > 0 else int(lengths.max())
    if p + max_new_tokens > context_length:
        raise UserError(f"{what} prompts of up to {p} tokens plus rollout.max_new_tokens={max_new_tokens} exceed "
                        f"the model's context of {context_length}; set data.max_prompt_tokens "
                        f"<= {context_length - max_new_tokens} or lower rollout.max_new_tokens")
    tokens, mask = pad_prompt_batch([prompts[i] for i in kept], max_new_tokens=max_new_tokens,
                                    context_length=context_length, length=p)
    return tokens, mask, kept


@dataclass
class Policy:
    """The trainable policy and its frozen reference, ready for the loop."""

    model: Any  # GPT (with LoRA adapters in lora mode): the training forward pass
    state: Any  # TrainState (restored on resume)
    tx: Any
    labels: Any  # the optimiser's label tree (the train step differentiates only "train" leaves)
    ref_params: Any  # frozen plain GPT params: the reference model
    trainable: int
    total: int
    iteration: int  # where the loop starts
    meta: dict  # the restored checkpoint's meta ({} for a new run)


def build_policy(cfg, run, keys, *, resume: bool, total_updates: int, loaded, extra_params: dict | None = None,
                 extra_trainable: Sequence[str] = ()) -> Policy:
    """Policy params (`--init` grafted, LoRA adapters in lora mode, plus `extra_params` such as
    a value head, trainable whatever the mode), its optimiser, and the reference.

    loaded: the `--init` params from `common.resolve_init` (None: random init from keys.init)."""
    from jaxgpt.model import GPT, init_params
    from jaxgpt.optim import TRAIN, make_optimizer
    from jaxgpt.rl.loop import restore
    from jaxgpt.steps import create_train_state
    from jaxgpt.tasks import common

    lora = common.lora_for(cfg)
    common.check_lora_targets(cfg, {"lora": lora})
    params = init_params(cfg.model, keys.init, lora=lora)
    if loaded is not None:
        params = common.graft(params, loaded, cfg.finetune.init)
    params = dict(params)
    ref_params = jax.device_put(jax.device_get(plain_params(params, cfg)))  # its own copy, on device once
    params.update(extra_params or {})
    labels = common.train_labels(params, cfg.finetune.train_mode, cfg.model.n_layer)
    labels = {k: (jax.tree_util.tree_map(lambda _: TRAIN, v) if k in extra_trainable else v)
              for k, v in labels.items()}
    trainable, total = common.param_counts(params, labels)
    tx = make_optimizer(cfg.train, labels, total_updates)
    state = create_train_state(params, tx)
    iteration, meta = 0, {}
    if resume:
        state, meta = restore(run, state)
        iteration = int(meta.get("iteration", 0))
    return Policy(GPT(cfg.model, lora=lora), state, tx, labels, ref_params, trainable, total, iteration, meta)


def plain_params(params, cfg, drop: Sequence[str] = ("value_head",)):
    """The GPT params the sampler and the reward/reference code read: LoRA merged (lora mode),
    extra heads dropped."""
    from jaxgpt.lora import has_lora, merge_lora

    params = {k: v for k, v in params.items() if k not in drop}
    if has_lora(params):  # merged on the host (merge_lora is numpy): small next to a rollout
        params = merge_lora(jax.device_get(params), cfg.lora)
    return params


def generate_all(params, model_cfg, tokens: np.ndarray, mask: np.ndarray, key, *, batch: int, **kwargs) -> list[dict]:
    """`rollout` (one sample per prompt) over all prompts in chunks of `batch` rows; the last
    chunk is padded with copies of its first row so every call has one shape. Returns host
    dicts trimmed to the real rows."""
    from jaxgpt.rl.rollout import rollout

    outs = []
    for start in range(0, len(tokens), batch):
        t, m = tokens[start:start + batch], mask[start:start + batch]
        real = len(t)
        if real < batch:
            t = np.concatenate([t, np.repeat(t[:1], batch - real, 0)])
            m = np.concatenate([m, np.repeat(m[:1], batch - real, 0)])
        out = jax.device_get(rollout(params, model_cfg, t, m, jax.random.fold_in(key, start), **kwargs))
        outs.append({k: v[:real] for k, v in out.items()})
    return outs


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


__all__ = ["Policy", "RolloutConfig", "Timer", "build_policy", "generate_all", "plain_params", "prompt_arrays",
           "sampling_kwargs", "validate_rollout"]
