"""Shared command-line plumbing: config flags, and turning `UserError` into exit code 2."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Sequence

from jaxgpt.errors import UserError


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point: a `UserError` becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # the loop has already saved and said how to resume
            return 130

    return wrapper


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: configs/default.yaml settings)")
    parser.add_argument("--model-config", metavar="FILE",
                        help="take the model section (the shape) from FILE, any config file, e.g. configs/gpt2-124m.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set model.n_layer=4 (repeatable)",
    )


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (TPU pods and SLURM are detected without these)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes (hosts)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    group.add_argument("--peer-timeout", type=float, metavar="S",
                       help="seconds without a heartbeat after which another process counts as dead and this "
                            "one exits with an error (default: $JAXGPT_PEER_TIMEOUT or 60)")


def initialize_distributed(args: argparse.Namespace) -> None:
    """Start jax.distributed from the flags (or the environment) before any device is used."""
    from jaxgpt.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id,
               peer_timeout=getattr(args, "peer_timeout", None))


def main_entry(main: Callable[[Sequence[str] | None], int]) -> None:
    """`if __name__ == "__main__": main_entry(main)`."""
    sys.exit(main(None))
