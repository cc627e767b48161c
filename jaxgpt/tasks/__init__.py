"""Tasks: pretraining (`pretrain`, for train.py) and one module per `finetune.py TASK`.

A task module defines its config class (a `common.TaskConfig` subclass, defaults in
`configs/finetune/<task>.yaml`), its recipe (`RECIPE`, a `jaxgpt.engine.Recipe` subclass)
and a Python entry point (`finetune_classifier`, ...) that calls `jaxgpt.engine.driver.train`.
Adding a task is one module plus its `TASKS` entry below, whose `flags` are the task's own
command-line shorthands for config keys (the shared ones are in `jaxgpt.cli.common.add_finetune_args`).
Modules are imported only when their subcommand runs, so `finetune.py --help` stays fast.
Config files `configs/finetune/<task>.yaml` and `configs/finetune/<task>-<variant>.yaml`
belong to `<task>`'s config class (`config_class_for`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from jaxgpt.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


@dataclass(frozen=True)
class Flag:
    """A task-only flag: `option VALUE` sets config key `key` (refused with --resume and
    with the shared flag `excludes`, e.g. --data)."""

    option: str
    key: str
    metavar: str
    help: str
    excludes: str = ""

    @property
    def dest(self) -> str:  # not "task": finetune.py's subcommand is stored there
        return "flag_" + self.option.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Task:
    module: str
    help: str
    flags: tuple[Flag, ...] = ()


TASKS: dict[str, Task] = {
    "classify": Task("jaxgpt.tasks.classify",
                     "sequence classification (default: SMS spam), full / last-block / LoRA training"),
    "instruct": Task("jaxgpt.tasks.instruct",
                     "instruction fine-tuning (Alpaca format, default: bundled 1,100 instructions), scored by ROUGE-L",
                     (Flag("--task", "data.task", "NAME", "SFT on a verifiable task's SFT split (e.g. arithmetic) "
                                                          "instead of --data (sets data.task)", excludes="data"),)),
    "reward": Task("jaxgpt.tasks.reward",
                   "reward model on preference pairs (Bradley-Terry), default: bundled preference data"),
    "dpo": Task("jaxgpt.tasks.dpo", "direct preference optimisation against a frozen reference model"),
    "grpo": Task("jaxgpt.tasks.grpo", "GRPO with verifiable rewards (arithmetic, gsm8k)",
                 (Flag("--task", "data.task", "TASK", "verifiable task: arithmetic[:digits=1,operands=3,ops=+-,"
                                                      "style=chain] (the defaults) | gsm8k (sets data.task)"),)),
    "ppo": Task("jaxgpt.tasks.ppo", "RLHF with PPO against a reward model",
                (Flag("--reward", "ppo.reward", "RUN", "the reward model: a `finetune.py reward` run, or a "
                                                       "Hugging Face one-score *ForSequenceClassification folder "
                                                       "or hub id (sets ppo.reward)"),)),
}


def load(name: str) -> ModuleType:
    if name not in TASKS:
        raise UserError(f"unknown fine-tuning task {name!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name].module)


def default_config(name: str) -> Path:
    return CONFIG_DIR / "finetune" / f"{name}.yaml"


def task_of_config(path: str | Path) -> str | None:
    """The task a config file belongs to: `configs/finetune/classify[-x].yaml` -> "classify"."""
    path = Path(path)
    if path.parent.name != "finetune":
        return None
    for name in sorted(TASKS, key=len, reverse=True):
        if path.stem == name or path.stem.startswith(name + "-"):
            return name
    return None


def config_class_for(path: str | Path):
    """The config class that loads `path`: a task's, or pretraining's `Config`."""
    task = task_of_config(path)
    if task is None:
        from jaxgpt.config import Config

        return Config
    return load(task).RECIPE.config_class
