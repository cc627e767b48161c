#!/usr/bin/env python
"""Fine-tune a GPT: one subcommand per task. `python finetune.py TASK --help` for options.

    python finetune.py classify --out runs/spam                    # bundled SMS spam, random init
    python finetune.py classify --init gpt2 --train-mode lora --set lora.rank=16 --out runs/spam-lora
    python finetune.py classify --resume runs/spam --set train.epochs=10

Every task shares train.py's conventions: `--config`/`--set` (a task's config defaults live in
configs/finetune/TASK.yaml), `--model-config FILE` (the model shape from any config file),
`--init SPEC` (default: random init), `--out RUN`, `--resume RUN`, and the run directory
layout (config.yaml, metrics.jsonl, metrics.json, plots, checkpoints/). `--train-mode
full|last-block|lora` picks which parameters train. The tasks live in jaxgpt/tasks/
(registry: jaxgpt.tasks.TASKS).
"""
from __future__ import annotations

import argparse
import sys

from jaxgpt.cli.common import add_finetune_args, exit_on_user_error, load_task_config
from jaxgpt.errors import UserError
from jaxgpt.cli.hostmem import reexec_with_huge_pages
from jaxgpt.tasks import TASKS, default_config, load


def build_parser() -> argparse.ArgumentParser:
    """Subcommands for every task, from the registry (no task module is imported)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:5]))
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, entry in TASKS.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        add_finetune_args(p)
        for flag in entry.flags:
            p.add_argument(flag.option, dest=flag.dest, metavar=flag.metavar, help=flag.help)
        p.set_defaults(parser=p)
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    from jaxgpt.engine.driver import train  # heavy imports after --help

    extra = {}
    for flag in TASKS[args.task].flags:
        value = getattr(args, flag.dest)
        if value and flag.excludes and getattr(args, flag.excludes):
            raise UserError(f"{flag.option} and --{flag.excludes} are alternatives: give one of them")
        extra[flag.key] = value
    recipe = load(args.task).RECIPE
    cfg, out, resume = load_task_config(args, recipe.config_class, default_config(args.task), args.parser, extra)
    train(recipe, cfg, out, resume=resume)
    return 0


if __name__ == "__main__":
    reexec_with_huge_pages()  # before any work: see jaxgpt.cli.hostmem
    sys.exit(main())
