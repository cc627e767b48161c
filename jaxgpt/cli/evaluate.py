"""`python -m jaxgpt evaluate`: score a model on a verifiable task's held-out problems.

    python -m jaxgpt evaluate --init runs/grpo --task arithmetic --samples 8
    python -m jaxgpt evaluate --init runs/sft --task gsm8k --samples 4 --max-new-tokens 256

Reports (`jaxgpt.rl.evaluation`, the numbers GRPO's metrics.json has before and after):
greedy `accuracy` (the task's verifier: strict for arithmetic, the math verifier for gsm8k),
`format_rate` (a final answer could be read), `completion_len` (mean tokens, the end token
included), per-line `step_accuracy` for arithmetic, and with `--samples K` the unbiased
`pass_at_k` for k = 1..K (Chen et al. 2021) of K completions a problem sampled at
`--temperature`, with the samples' accuracy, format rate and length. Prompts are the Alpaca
format (`jaxgpt.text.prompts.prompt_format`: its chat template, else Alpaca, as `finetune.py
instruct` and `grpo` use),
generated in batches of `--batch` rows.

Prints the figures and writes them as JSON to `--out` (default: `RUN/evaluate-TASK-SPLIT.json`
when `--init` is a directory, else `evaluate-TASK-SPLIT.json` here). Bad input (an unknown
task, a data file with no parsable reference answers, prompts too long for the context, ...)
is one line on stderr, exit code 2, and nothing written.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from jaxgpt.cli.common import exit_on_user_error, main_entry
from jaxgpt.errors import UserError
from jaxgpt.io.files import atomic_write

DEFAULT_NEW_TOKENS = {"arithmetic": 24, "gsm8k": 256}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt evaluate",
                                     description="Accuracy, pass@k, format rate and completion length on a "
                                                 "verifiable task's held-out split.")
    parser.add_argument("--init", required=True, metavar="SPEC",
                        help="the model: a run directory (e.g. a finetune.py instruct or grpo run), a Hugging Face "
                             "model folder or hub id, a PEFT adapter, or a preset name")
    parser.add_argument("--task", required=True, metavar="TASK",
                        help="arithmetic[:digits=1,operands=3,...] | gsm8k[:verifier=math|strict]")
    parser.add_argument("--data", default="", metavar="SOURCE",
                        help="gsm8k: {question, answer} records: a JSONL or parquet file or folder, or a hub data set "
                             "(hf:openai/gsm8k:main:test; default: the bundled GSM8K test split)")
    parser.add_argument("--split", default="eval", choices=("eval", "rl", "val", "sft"),
                        help="which split of the task (default: eval, the held-out one GRPO reports)")
    parser.add_argument("--samples", type=int, default=0, metavar="K",
                        help="sampled completions a problem for pass@1..K (default: 0, greedy only)")
    parser.add_argument("--temperature", type=float, default=0.6, metavar="T",
                        help="temperature of the --samples (default: 0.6)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling for the --samples")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="completion budget (default: 24 for arithmetic, 256 for gsm8k)")
    parser.add_argument("--max-prompt-tokens", type=int, default=0, metavar="N",
                        help="drop longer prompts (default: 0, keep all)")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="the first N problems only (default: all)")
    parser.add_argument("--batch", type=int, default=128, metavar="ROWS", help="rows a generation call (default: 128)")
    parser.add_argument("--seed", type=int, default=0,
                        help="which problems and their order, and the sampling key: a GRPO run's data.seed and "
                             "train.seed (with its rollout.eval_batch_size as --batch, the figures are its own)")
    parser.add_argument("--out", metavar="FILE", help="where the JSON goes (default: see the module docstring)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag, value, least in (("--samples", args.samples, 0), ("--limit", args.limit, 0), ("--batch", args.batch, 1),
                               ("--max-prompt-tokens", args.max_prompt_tokens, 0), ("--seed", args.seed, 0)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0 (greedy accuracy is always reported), got {args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")


def out_path(args: argparse.Namespace, task_name: str) -> Path:
    if args.out:
        return Path(args.out)
    name = f"evaluate-{task_name}-{args.split}.json"
    init = Path(args.init).expanduser()
    return init / name if init.is_dir() else Path(name)


def report(result: dict) -> str:
    lines = [f"{result['init']} on {result['task']} ({result['split']} split, {result['problems']} problems"
             f"{', %d dropped as too long' % result['dropped'] if result['dropped'] else ''})",
             f"  accuracy (greedy)   {result['accuracy']:.4f}",
             f"  format rate         {result['format_rate']:.4f}",
             f"  completion length   {result['completion_len']:.1f} tokens"]
    if "step_accuracy" in result:
        lines.append(f"  step accuracy       {' '.join(f'{v:.3f}' for v in result['step_accuracy'])}")
    if "pass_at_k" in result:
        ks = result["pass_at_k"]
        lines.append(f"  pass@k (T {result['temperature']}, {result['samples']} samples)  "
                     + "  ".join(f"@{k} {v:.4f}" for k, v in ks.items()))
        lines.append(f"  sampled: format rate {result['sample_format_rate']:.4f}, "
                     f"length {result['sample_completion_len']:.1f} tokens")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from jaxgpt.rl.tasks import get_task

    task = get_task(args.task, args.data)
    task.split(args.split, args.seed)  # reads and checks the data (references) before the model loads
    out = out_path(args, task.name)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no such directory {out.parent}")

    from jaxgpt.cli.generate import load_init
    from jaxgpt.engine.keys import Keys
    from jaxgpt.rl.evaluation import evaluate_policy
    from jaxgpt.rl.prompt_sets import split_prompts
    from jaxgpt.text.tokenizer import tokenizer_of

    n = args.max_new_tokens or DEFAULT_NEW_TOKENS.get(task.name, 64)
    config, params = load_init(args.init)
    tokenizer = tokenizer_of(config)
    try:
        problems, tokens, mask, dropped = split_prompts(
            task, args.split, seed=args.seed, size=args.limit, max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=n, context_length=config.context_length, name=args.task, tokenizer=tokenizer)
    except UserError as e:  # its wording names the config keys; here they are flags
        raise UserError(str(e).replace("data.max_prompt_tokens", "--max-prompt-tokens")
                        .replace("rollout.max_new_tokens", "--max-new-tokens")) from None
    started = time.perf_counter()
    metrics, _ = evaluate_policy(params, config, task, problems, tokens, mask, Keys.from_seed(args.seed).sample,
                                 samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                 batch=args.batch, max_new_tokens=n, tokenizer=tokenizer)
    result = {"init": args.init, "task": args.task, "data": args.data, "split": args.split,
              "problems": len(problems), "dropped": dropped, "max_new_tokens": n, "samples": args.samples,
              "temperature": args.temperature if args.samples else None, "top_p": args.top_p, "seed": args.seed,
              **metrics, "seconds": time.perf_counter() - started}
    print(report(result))
    atomic_write(out, json.dumps(result, indent=2) + "\n", "the evaluation figures")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    main_entry(main)
