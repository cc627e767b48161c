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

    return wrapper


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: configs/default.yaml settings)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set model.n_layer=4 (repeatable)",
    )


def main_entry(main: Callable[[Sequence[str] | None], int]) -> None:
    """`if __name__ == "__main__": main_entry(main)`."""
    sys.exit(main(None))
