"""Shared command-line plumbing: config flags (train.py's and every `finetune.py TASK`'s),
loading a task's config from them, and turning `UserError` into exit code 2. Imports stay
light (no jax) so `--help` is fast."""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from jaxgpt.config import INIT_KEPT, TRAIN_MODES, load_config
from jaxgpt.errors import UserError


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point: a `UserError` becomes one line on stderr and exit code 2; a run
    stopped by Ctrl-C exits 130, by SIGTERM 143 (`jaxgpt.engine.preemption`; the loop has
    saved and said how to resume). In a multi-process run, an exit that the other processes
    do not share (an error, a second signal) leaves at once (`distributed.leave`), so it
    never waits for them in JAX's shutdown barrier; they notice within --peer-timeout."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return _together(main(*args, **kwargs) or 0)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return _alone(2)
        except KeyboardInterrupt as e:  # Stopped (130 / 143), or Ctrl-C outside a run (130)
            if getattr(e, "message", ""):
                print(e.message, file=sys.stderr)
            code = getattr(e, "exit_code", 130)
            return _together(code) if getattr(e, "agreed", False) else _alone(code)
        except BaseException:
            if _multiprocess():
                import traceback

                traceback.print_exc()
                _alone(1)
            raise

    return wrapper


def _multiprocess() -> bool:
    if "jax" not in sys.modules:  # jax not even imported: not started
        return False
    from jaxgpt.parallel.distributed import is_multiprocess

    return is_multiprocess()


def _together(code: int) -> int:
    """`code`, for an exit every process makes (noted for the watchdog: see distributed)."""
    if _multiprocess():
        from jaxgpt.parallel.distributed import set_exit_code

        set_exit_code(code)
    return code


def _alone(code: int) -> int:
    """`code`, or (multi-process) exit now with it: see `exit_on_user_error`."""
    if _multiprocess():
        from jaxgpt.parallel.distributed import leave

        leave(code)
    return code


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
    from jaxgpt.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id,
               peer_timeout=getattr(args, "peer_timeout", None))


# ---------------------------------------------------------------------------------------
# Fine-tuning tasks (`finetune.py TASK`)


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    """The flags every `finetune.py TASK` takes."""
    add_config_args(parser)
    for action in parser._actions:
        if action.dest == "config":
            action.help = "YAML config file (default: configs/finetune/<task>.yaml)"
    parser.add_argument("--init", metavar="SPEC",
                        help="start from weights: a run directory, a Hugging Face model folder or hub id "
                             "(Qwen/Qwen3-0.6B), a PEFT adapter, or a preset such as gpt2 (default: random init; "
                             "sets finetune.init)")
    parser.add_argument("--train-mode", metavar="MODE",
                        help=f"which params train: {' | '.join(TRAIN_MODES)} (sets finetune.train_mode)")
    parser.add_argument("--data", help="data: a bundled name, a file or folder, hf:ORG/NAME[:SUBSET][:SPLIT] or "
                                       "tfds:NAME (sets data.path)")
    parser.add_argument("--out", help="run directory (default: runs/<task>-<timestamp>)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")


def _quoted(key: str, value: str) -> str:
    """A `--set` item whose value stays a string through --set's YAML parsing."""
    return f"{key}={json.dumps(value)}"


def load_task_config(args: argparse.Namespace, cls, default_path: Path, parser: argparse.ArgumentParser,
                     extra: dict[str, str] | None = None):
    """`(cfg, run_dir, resume)` from the shared flags; `extra`: a task's own flags as
    `{config key: value}` (string values). Resuming reads RUN/config.yaml."""
    from jaxgpt.tasks.common import validate_finetune  # imports jax: after --help

    flags = {"data.path": args.data, "finetune.train_mode": args.train_mode, "finetune.init": args.init,
             **(extra or {})}
    overrides = list(args.overrides) + [_quoted(k, v) for k, v in flags.items() if v]
    if args.resume:
        if args.config or args.out or getattr(args, "model_config", None) or any(flags.values()):
            parser.error("--resume takes its config, data, weights, train mode and directory from the run; "
                         "use only --set with it")
        path = Path(args.resume) / "config.yaml"
        if not path.is_file():
            raise UserError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        cfg = load_config(path, overrides, cls=cls)
        check_resume_overrides(cfg, load_config(path, cls=cls), args.resume)
        check_step_overrides(cfg, args.overrides)
        validate_finetune(cfg)
        return cfg, Path(args.resume), True
    model_file = getattr(args, "model_config", None)
    cfg = load_config(args.config or default_path, overrides, cls=cls, model_file=model_file)
    check_init_overrides(cfg.finetune.init, args.overrides, model_file)
    check_step_overrides(cfg, args.overrides)
    validate_finetune(cfg)
    return cfg, Path(args.out) if args.out else None, False


def check_init_overrides(init: str, overrides: Sequence[str], model_file: str | None = None) -> None:
    """With `--init` the model's shape is the checkpoint's: a `--set model.KEY` it would replace,
    or `--model-config`, is refused (one line) rather than silently ignored."""
    if not init:
        return
    if model_file:
        raise UserError(f"--model-config {model_file} and --init {init} both give the model's shape; use one of them")
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.startswith("model.") and key.removeprefix("model.") not in INIT_KEPT:
            raise UserError(f"--set {key}: the model's shape comes from --init {init}; with --init only "
                            f"{', '.join('model.' + k for k in INIT_KEPT)} can be set")


def check_resume_overrides(cfg, saved, run: str | Path) -> None:
    """A resumed run continues its checkpoint, which fixes the model's shape, the train mode and
    the LoRA adapters: a `--set` that would change them (`cfg` against the run's own `saved`
    config; restating a value is fine) is refused in one line before the checkpoint is read,
    not reported as a mismatched tree of optimiser state."""
    import dataclasses

    for section, changeable in (("model", INIT_KEPT), ("finetune", ()), ("lora", ("alpha",))):
        new, old = getattr(cfg, section, None), getattr(saved, section, None)
        for f in dataclasses.fields(new) if new is not None else ():
            if f.name not in changeable and getattr(new, f.name) != getattr(old, f.name):
                kept = ", ".join("model." + k for k in INIT_KEPT)
                raise UserError(f"--set {section}.{f.name}: a resumed run keeps its checkpoint's model shape, train "
                                f"mode and LoRA adapters (only {kept} and lora.alpha can change); to change them, "
                                f"start a new run with --init {run}")


def check_step_overrides(cfg, overrides: Sequence[str]) -> None:
    """A run of `train.epochs` > 0 counts its steps in epochs: a `--set train.max_steps` or
    `train.eval_interval` it would ignore is refused (one line) rather than silently unused."""
    if cfg.train.epochs <= 0:
        return
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in ("train.max_steps", "train.eval_interval"):
            raise UserError(f"--set {override.strip()} has no effect while train.epochs={cfg.train.epochs} "
                            f"(the run counts epochs); add --set train.epochs=0 to count steps instead")


@contextlib.contextmanager
def keys_as_flags(**flags: str):
    """A `UserError` raised inside says `--text-field` where it said `set data.text_field`: a
    command whose flag sets that key (`keys_as_flags(text_field="--text-field")`) names its flag."""
    try:
        yield
    except UserError as e:
        message = str(e)
        for key, flag in flags.items():
            message = message.replace(f"set data.{key}", f"give {flag}")
        if message == str(e):
            raise
        raise UserError(message) from None


def read_lines(path: str | Path, flag: str) -> list[str]:
    """The non-blank lines of the UTF-8 text file `path`, given as `flag` (named in errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not UTF-8 text") from None


def main_entry(main: Callable[[Sequence[str] | None], int]) -> None:
    """`if __name__ == "__main__": main_entry(main)`."""
    sys.exit(main(None))
