#!/usr/bin/env python
"""Pretrain a GPT. `python train.py --help` for options; logic lives in jaxgpt.trainer."""
from __future__ import annotations

import argparse
import sys

from jaxgpt.cli import add_config_args, add_distributed_args, exit_on_user_error, initialize_distributed
from jaxgpt.config import load_config


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(".")[0])
    add_config_args(parser)
    parser.add_argument("--data", help="corpus: bundled name, text file, folder of .txt, or tfds:NAME (sets data.path)")
    parser.add_argument("--out", help="run directory (default: runs/train-<timestamp>)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")
    parser.add_argument("--init", metavar="SPEC", help="start from weights: a run directory, an HF GPT-2 directory, or gpt2/gpt2-medium/...")
    add_distributed_args(parser)
    args = parser.parse_args(argv)
    initialize_distributed(args)

    from jaxgpt import trainer  # heavy imports after --help

    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    if args.resume:
        if args.config or args.out or args.init:
            parser.error("--resume takes its config and directory from the run; use only --set with it")
        cfg = trainer.resume_config(args.resume, overrides)
        trainer.pretrain(cfg, args.resume, resume=True)
        return 0
    params = None
    cfg = load_config(args.config or trainer.DEFAULT_CONFIG, overrides)
    if args.init:
        cfg, params = trainer.init_from(args.init, cfg)
    trainer.pretrain(cfg, args.out, params=params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
