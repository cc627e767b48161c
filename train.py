#!/usr/bin/env python
"""Pretrain a GPT. `python train.py --help` for options; logic lives in jaxgpt.tasks.pretrain."""
from __future__ import annotations

import argparse
import sys

from jaxgpt.cli.common import (add_config_args, add_distributed_args, check_init_overrides, check_resume_overrides,
                               exit_on_user_error, initialize_distributed)
from jaxgpt.config import load_config
from jaxgpt.cli.hostmem import reexec_with_huge_pages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split(".")[0])
    add_config_args(parser)
    parser.add_argument("--data", help="corpus: bundled name, text file, .jsonl(.gz), .parquet, a folder of them, "
                        "hf:ORG/NAME[:SUBSET][:SPLIT] or tfds:NAME (sets data.path)")
    parser.add_argument("--out", help="run directory (default: runs/train-<timestamp>)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")
    parser.add_argument("--init", metavar="SPEC", help="start from weights (their shape): a run directory, a Hugging "
                        "Face folder or hub id, or a preset (gpt2, gpt2-medium, qwen3-0.6b, ...)")
    add_distributed_args(parser)
    return parser


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The `--set` overrides, `--data` among them."""
    return list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])


def config_of(args: argparse.Namespace):
    """A new run's config from the flags (`--init`'s checkpoint sets the model shape later)."""
    from jaxgpt.tasks.pretrain import DEFAULT_CONFIG

    check_init_overrides(args.init, args.overrides, args.model_config)
    return load_config(args.config or DEFAULT_CONFIG, overrides_of(args), model_file=args.model_config,
                       model_from_init=bool(args.init))


@exit_on_user_error
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    initialize_distributed(args)

    from jaxgpt.io.checkpoint import read_run_config  # heavy imports after --help
    from jaxgpt.engine.rundir import RunDir
    from jaxgpt.tasks import pretrain

    if args.resume:
        if args.config or args.model_config or args.out or args.init:
            parser.error("--resume takes its config and directory from the run; use only --set with it")
        RunDir(args.resume, resume=True)  # one line when RUN holds no checkpoint, before its config is read
        cfg = read_run_config(args.resume, overrides_of(args))
        check_resume_overrides(cfg, read_run_config(args.resume), args.resume)
        pretrain.pretrain(cfg, args.resume, resume=True)
        return 0
    pretrain.pretrain(config_of(args), args.out, init=args.init)
    return 0


if __name__ == "__main__":
    reexec_with_huge_pages()  # before any work: see jaxgpt.cli.hostmem
    sys.exit(main())
