#!/usr/bin/env python
"""Fine-tune a GPT: one subcommand per task. `python finetune.py TASK --help` for options.

    python finetune.py classify --out runs/spam                    # bundled SMS spam, random init
    python finetune.py classify --init gpt2 --train-mode lora --set lora.rank=16 --out runs/spam-lora
    python finetune.py classify --resume runs/spam --set train.epochs=10

Every task shares train.py's conventions: `--config`/`--set` (a task's config defaults live in
configs/finetune/TASK.yaml), `--init SPEC` (default: random init), `--out RUN`, `--resume RUN`,
and the run directory layout (config.yaml, metrics.jsonl, metrics.json, plots, checkpoints/).
`--train-mode full|last-block|lora` picks which parameters train. The tasks live in
jaxgpt/tasks/ (registry: jaxgpt.tasks.TASKS).
"""
from __future__ import annotations

import argparse
import sys

from jaxgpt.cli import exit_on_user_error
from jaxgpt.tasks import TASKS, load
from jaxgpt.tasks.common import add_finetune_args


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """Subcommands for every task; only `task`'s module is imported (for its own flags)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:5]))
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, entry in TASKS.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        add_finetune_args(p)
        if name == task:
            load(name).add_arguments(p)
        p.set_defaults(parser=p)
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    task = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(task if task in TASKS else None).parse_args(argv)
    return load(args.task).run(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
