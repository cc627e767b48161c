"""What every fine-tuning task shares: config sections, CLI flags, `--init`, train modes.

A task's config is a frozen dataclass with (at least) the sections

    model     ModelConfig (from --init SPEC when given: the checkpoint's shape)
    data      the task's data section
    train     FinetuneTrainConfig: TrainConfig + `epochs`
    lora      LoRAConfig (used when finetune.train_mode is lora)
    finetune  FinetuneConfig: `init` and `train_mode`

loaded like `train.py`'s (defaults <- task YAML <- --set), written to RUN/config.yaml, and
reloaded from there by `--resume RUN`. Flags are shorthands for config keys: `--init SPEC`
is `--set finetune.init=SPEC`, `--train-mode M` is `finetune.train_mode=M`, `--data X` is
`data.path=X`.

Train modes are label trees over the params (`jaxgpt.optim.make_optimizer`): one optimiser,
one step function, and frozen leaves get `optax.set_to_zero` (bitwise unchanged, no Adam
moments):

    full        every parameter trains
    last-block  the last transformer block h_{n-1}, the final LayerNorm ln_f and the task head
    lora        only the LoRA adapters (`lora_a`, `lora_b`); everything else, the head
                included, is frozen (put the head in lora.targets to adapt it, as the default does)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import TrainConfig, load_config, validate
from jaxgpt.errors import UserError
from jaxgpt.lora import LoRAConfig, check_targets, has_lora, is_lora_leaf, merge_lora, validate_lora

TRAIN_MODES = ("full", "last-block", "lora")
# Top-level parameters that belong to a task head rather than to the transformer.
HEAD_PARAMS = ("score",)


@dataclass(frozen=True)
class FinetuneTrainConfig(TrainConfig):
    """`train` section of fine-tuning: TrainConfig plus epochs.

    epochs > 0: train that many passes over the training set (incomplete last batch dropped),
    evaluating at the end of each epoch; `max_steps` and `eval_interval` are then unused.
    epochs = 0: train `max_steps` updates, evaluating every `eval_interval`.
    """

    epochs: int = 5


@dataclass(frozen=True)
class FinetuneConfig:
    """`finetune` section: where the weights start and which of them train."""

    init: str = ""  # --init SPEC: run dir, HF GPT-2 dir, OpenAI dir or preset (gpt2, ...); "" = random init
    train_mode: str = "full"  # full | last-block | lora


def validate_finetune(cfg) -> None:
    """Checks on the shared sections beyond `jaxgpt.config.validate` (called by load_task_config)."""
    validate(cfg)
    mode = cfg.finetune.train_mode
    if mode not in TRAIN_MODES:
        raise UserError(f"unknown train mode {mode!r} (--train-mode / finetune.train_mode); "
                        f"choose one of {', '.join(TRAIN_MODES)}")
    if cfg.train.epochs < 0:
        raise UserError(f"train.epochs must be >= 0, got {cfg.train.epochs}")
    validate_lora(cfg.lora)


# ---------------------------------------------------------------------------------------
# Command line


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    """The flags every `finetune.py TASK` takes."""
    from jaxgpt.cli import add_config_args

    add_config_args(parser)
    for action in parser._actions:
        if action.dest == "config":
            action.help = "YAML config file (default: configs/finetune/<task>.yaml)"
    parser.add_argument("--init", metavar="SPEC",
                        help="start from weights: a run directory, an HF GPT-2 directory, or gpt2/gpt2-medium/... "
                             "(default: random init; sets finetune.init)")
    parser.add_argument("--train-mode", metavar="MODE",
                        help=f"which params train: {' | '.join(TRAIN_MODES)} (sets finetune.train_mode)")
    parser.add_argument("--data", help="data: bundled name, file, or tfds:NAME (sets data.path)")
    parser.add_argument("--out", help="run directory (default: runs/<task>-<timestamp>)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """`--set` items for the shorthand flags (after the user's own --set items)."""
    out = list(args.overrides)
    if getattr(args, "data", None):
        out.append(f"data.path={args.data}")
    if getattr(args, "train_mode", None):
        out.append(f"finetune.train_mode={args.train_mode}")
    if getattr(args, "init", None):
        out.append(f"finetune.init={args.init}")
    return out


def _quote(item: str) -> str:
    """`key=value` with the value kept a string through --set's YAML parsing."""
    key, value = item.split("=", 1)
    return f"{key}={json.dumps(value)}"


def load_task_config(args: argparse.Namespace, cls, default_path: Path, parser: argparse.ArgumentParser):
    """`(cfg, run_dir, resume)` from the shared flags. Resuming reads RUN/config.yaml."""
    overrides = [o if not o.startswith(("data.path=", "finetune.init=", "finetune.train_mode="))
                 else _quote(o) for o in flag_overrides(args)]
    if args.resume:
        if args.config or args.out or args.init or args.data or args.train_mode:
            parser.error("--resume takes its config, data, weights, train mode and directory from the run; "
                         "use only --set with it")
        path = Path(args.resume) / "config.yaml"
        if not path.is_file():
            raise UserError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        cfg = load_config(path, overrides, cls=cls)
        validate_finetune(cfg)
        return cfg, Path(args.resume), True
    cfg = load_config(args.config or default_path, overrides, cls=cls)
    validate_finetune(cfg)
    return cfg, Path(args.out) if args.out else None, False


# ---------------------------------------------------------------------------------------
# Parameters: --init, LoRA, train-mode labels


def resolve_init(cfg):
    """`(cfg, params | None)`: with `finetune.init`, the model section becomes the checkpoint's
    (keeping this run's dropout, dtype, attention and remat) and its params are returned."""
    if not cfg.finetune.init:
        return cfg, None
    from jaxgpt.trainer import init_from

    return init_from(cfg.finetune.init, cfg)  # a LoRA run's adapters come merged (jaxgpt.hub)


def graft(fresh, loaded, source: str):
    """`fresh` with every leaf that `loaded` has at the same path replaced by the loaded one.

    The transformer (wte, wpe, h_i, ln_f) must all be in `loaded`; `lm_head` and other
    leaves the task model lacks are dropped; a head whose shape differs stays fresh."""
    from flax import traverse_util

    flat_fresh = traverse_util.flatten_dict(fresh)
    flat_loaded = traverse_util.flatten_dict(loaded)
    out = {}
    for path, leaf in flat_fresh.items():
        name = "/".join(path)
        got = flat_loaded.get(path)
        if got is None:
            if path[0] not in HEAD_PARAMS and not is_lora_leaf(path):
                raise UserError(f"--init {source}: missing parameter {name} {list(leaf.shape)}")
            out[path] = leaf
        elif tuple(np.shape(got)) != tuple(leaf.shape):
            if path[0] in HEAD_PARAMS:
                out[path] = leaf  # another task's head: start this one fresh
            else:
                raise UserError(f"--init {source}: {name} is {list(np.shape(got))}, this model expects {list(leaf.shape)}")
        else:
            out[path] = jnp.asarray(got, leaf.dtype)
    return traverse_util.unflatten_dict(out)


def train_labels(params, mode: str, n_layer: int):
    """The label tree of `mode` (see the module docstring) over `params`."""
    from jaxgpt.optim import label_params

    if mode == "full":
        return label_params(params, lambda path, leaf: True)
    if mode == "last-block":
        trainable = {f"h_{n_layer - 1}", "ln_f", *HEAD_PARAMS}
        return label_params(params, lambda path, leaf: path[0] in trainable)
    if mode == "lora":
        return label_params(params, lambda path, leaf: is_lora_leaf(path))
    raise UserError(f"unknown train mode {mode!r}; choose one of {', '.join(TRAIN_MODES)}")


def lora_for(cfg) -> LoRAConfig | None:
    """The model's `lora` attribute: the lora section in lora mode, else None."""
    return cfg.lora if cfg.finetune.train_mode == "lora" else None


def check_lora_targets(cfg, model_attrs: dict) -> None:
    """In lora mode, every lora.targets entry must match a dense layer (checked on shapes)."""
    if cfg.finetune.train_mode != "lora":
        return
    from jaxgpt.model import param_shapes

    plain = {k: v for k, v in model_attrs.items() if k != "lora"}
    check_targets(cfg.lora, param_shapes(cfg.model, **plain))


def param_counts(params, labels) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    from jaxgpt.optim import count_trainable

    total = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))
    return count_trainable(params, labels), total


def last_token(x, lengths):
    """`x[b, lengths[b] - 1]` for `x [b, t, ...]`: each row's last real (non-padding) position."""
    index = jnp.clip(lengths - 1, 0, x.shape[1] - 1).astype(jnp.int32)
    return jnp.take_along_axis(x, index.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def schedule_steps(cfg, steps_per_epoch: int) -> tuple[int, int]:
    """(total optimiser steps, eval interval) for `train.epochs` / `train.max_steps`."""
    t = cfg.train
    if t.epochs > 0:
        return t.epochs * steps_per_epoch, steps_per_epoch
    return t.max_steps, t.eval_interval


class TrainStart(NamedTuple):
    """What a fine-tuning task trains from (`start_training`)."""

    params: Any  # the initial params (--init grafted in); on --resume the checkpoint's are in state
    state: Any  # jaxgpt.steps.TrainState
    tx: Any  # the optax optimiser (frozen leaves masked by the train mode)
    labels: Any  # its label tree: the train step differentiates only the "train" leaves
    trainable: int
    total: int
    total_steps: int
    eval_interval: int


def start_training(cfg, params, loaded, steps_per_epoch: int, run, resume: bool) -> TrainStart:
    """Graft `loaded` (--init) into freshly initialised `params`, label the leaves the train
    mode trains, build the optimiser and train state; on `--resume` the run's latest
    checkpoint (step, params, Adam moments) replaces the state."""
    from jaxgpt import checkpoint
    from jaxgpt.optim import make_optimizer
    from jaxgpt.steps import TrainState, create_train_state
    from jaxgpt.trainer import log

    if loaded is not None:
        params = graft(params, loaded, cfg.finetune.init)
    labels = train_labels(params, cfg.finetune.train_mode, cfg.model.n_layer)
    trainable, total = param_counts(params, labels)
    total_steps, eval_interval = schedule_steps(cfg, steps_per_epoch)
    tx = make_optimizer(cfg.train, labels, total_steps)
    state = create_train_state(params, tx)
    if resume:
        target = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        restored, _ = checkpoint.restore(run.path, target=target)
        state = TrainState(**restored)
        log(f"resuming {run.path} from step {int(state.step)}")
    return TrainStart(params, state, tx, labels, trainable, total, total_steps, eval_interval)


def loop_config(cfg, eval_interval: int):
    """The config the shared TrainLoop sees: `train.eval_interval` set to the effective one."""
    train = dataclasses.replace(cfg.train, eval_interval=eval_interval)
    return dataclasses.replace(cfg, train=train)


# ---------------------------------------------------------------------------------------
# Loading a finished fine-tuning run (for prediction, evaluation, or as --init)


def load_run(run_dir: str | Path, cls, *, merge: bool = True) -> tuple[Any, Any]:
    """`(cfg, params)` of a fine-tuning run's latest checkpoint; LoRA adapters merged."""
    from jaxgpt import checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a jaxgpt run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", cls=cls)
    if checkpoint.latest_step(run_dir) is None:
        raise UserError(f"{run_dir} has no checkpoint (looked in {run_dir / checkpoint.CHECKPOINT_DIR})")
    _, params = checkpoint.load_params(run_dir, config_cls=cls)
    if merge and has_lora(params):
        params = merge_lora(params, cfg.lora)
    return cfg, params


__all__ = [
    "FinetuneConfig", "FinetuneTrainConfig", "TRAIN_MODES", "add_finetune_args", "check_lora_targets",
    "flag_overrides", "graft", "last_token", "load_run", "load_task_config", "lora_for", "loop_config",
    "param_counts", "resolve_init", "schedule_steps", "train_labels", "validate_finetune",
]
