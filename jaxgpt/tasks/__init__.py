"""Fine-tuning tasks: one module per `python finetune.py TASK` subcommand.

Adding a task is one `TASKS` entry plus its module, which defines

    CONFIG_CLASS             the task's frozen config dataclass (see jaxgpt.tasks.common)
    DEFAULT_CONFIG           configs/finetune/<task>.yaml
    add_arguments(parser)    task-only flags (the shared ones come from common.add_finetune_args)
    run(args, parser) -> int the command

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
class Task:
    module: str
    help: str


TASKS: dict[str, Task] = {
    "classify": Task("jaxgpt.tasks.classify",
                     "sequence classification (default: SMS spam), full / last-block / LoRA training"),
    "instruct": Task("jaxgpt.tasks.instruct",
                     "instruction fine-tuning (Alpaca format, default: bundled 1,100 instructions), scored by ROUGE-L"),
    "reward": Task("jaxgpt.tasks.reward",
                   "reward model on preference pairs (Bradley-Terry), default: bundled preference data"),
    "dpo": Task("jaxgpt.tasks.dpo", "direct preference optimisation against a frozen reference model"),
    "grpo": Task("jaxgpt.tasks.grpo", "GRPO with verifiable rewards (arithmetic, gsm8k)"),
    "ppo": Task("jaxgpt.tasks.ppo", "RLHF with PPO against a reward model"),
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
    return load(task).CONFIG_CLASS
