"""`python -m jaxgpt perplexity`: a model's next-token loss and perplexity on a corpus.

    python -m jaxgpt perplexity --init gpt2 --data the-verdict --context-length 256 --val-ratio 0.1
    python -m jaxgpt perplexity --init runs/mine --data corpus/ --out ppl.json
    python -m jaxgpt perplexity --init gpt2 --data wiki.txt --context-length 1024 --stride 512

`--init` is any model `generate` loads (a run directory, a Hugging Face folder: GPT-2,
Llama 3, Qwen3, Gemma 3, or a preset); the corpus is anything `train.py --data` takes,
tokenized with the model's own tokenizer. It is cut as pretraining cuts it
(`jaxgpt.data.make_splits`: non-overlapping windows of `--context-length` tokens, the last
`--val-ratio` of the stream apart), so `--val-ratio` equal to a run's `data.val_ratio` and
its context length gives the run's `val_loss`. With `--val-ratio 0` (the default) the whole
corpus is one split, `all`; `--max-windows N` scores only each split's first N windows.
`--stride S` below the context slides the windows S tokens at a time, each scoring only the
S targets no earlier window scored (every target once, with at least T - S tokens of
context). Each split's loss is the mean over its scored target tokens,
in nats (`jaxgpt.train.perplexity.corpus_loss`), pmapped over the local devices; with it the
perplexity and, where the tokenizer's byte lengths are known (`jaxgpt.text.token_bytes`),
bits per byte, which unlike perplexity compares models with different tokenizers.

Prints a table and, with `--out`, writes it as JSON. Bad input (no such model or corpus, a
corpus shorter than one window, a tokenizer with more ids than the model's vocabulary, a
context longer than the model's) is one line on stderr, exit code 2, and nothing written.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from jaxgpt.cli.common import exit_on_user_error, keys_as_flags, main_entry
from jaxgpt.errors import UserError
from jaxgpt.io.files import atomic_write


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt perplexity",
                                     description="Next-token loss, perplexity and bits per byte of a model on a corpus.")
    parser.add_argument("--init", required=True, metavar="SPEC",
                        help="the model: a run directory, a Hugging Face model folder or hub id, a PEFT adapter, or a "
                             "preset name (gpt2, ...)")
    parser.add_argument("--data", default="the-verdict", metavar="SOURCE",
                        help="bundled corpus name, text file, .jsonl(.gz), .parquet, folder of .txt/.jsonl/.parquet "
                             "files, hf:ORG/NAME[:SUBSET][:SPLIT] or tfds:NAME[:SPLIT] (default: the-verdict)")
    parser.add_argument("--context-length", type=int, default=0, metavar="T",
                        help="tokens a window (default: 0, the model's context)")
    parser.add_argument("--stride", type=int, default=0, metavar="S",
                        help="windows start every S tokens, each scoring the targets no earlier one did "
                             "(default: 0, the context length: non-overlapping windows)")
    parser.add_argument("--val-ratio", type=float, default=0.0, metavar="R",
                        help="score the first 1-R and the last R of the token stream apart, as train.py splits "
                             "them (default: 0, the whole corpus)")
    parser.add_argument("--max-windows", type=int, default=0, metavar="N",
                        help="score only the first N windows of each split, a quick estimate on a large corpus "
                             "(default: 0, all)")
    parser.add_argument("--batch", type=int, default=0, metavar="WINDOWS",
                        help="windows a step, a multiple of the devices (default: 0, 8 or the next multiple of the "
                             "devices)")
    parser.add_argument("--cache-dir", default="", metavar="DIR",
                        help="token file cache (default: $JAXGPT_CACHE or ~/.cache/jaxgpt/tokens)")
    parser.add_argument("--text-field", default="text", metavar="FIELD",
                        help="the text field of a .jsonl or .parquet corpus or tfds source")
    parser.add_argument("--out", metavar="FILE", help="also write the figures as JSON here")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.context_length < 0:
        raise UserError(f"--context-length must be >= 0, got {args.context_length}")
    if args.stride < 0:
        raise UserError(f"--stride must be >= 0, got {args.stride}")
    if not 0.0 <= args.val_ratio < 1.0:
        raise UserError(f"--val-ratio must be in [0, 1), got {args.val_ratio}")
    if args.max_windows < 0:
        raise UserError(f"--max-windows must be >= 0, got {args.max_windows}")
    if args.batch < 0:
        raise UserError(f"--batch must be >= 0, got {args.batch}")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise UserError(f"--out {out} is a directory")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: no such directory {out.parent}")


def _flags(message: str) -> str:
    """A data error worded with config keys, reworded with this command's flags."""
    for key, flag in (("data.val_ratio=0", "--val-ratio 0"), ("data.val_ratio", "--val-ratio"), ("data.path", "--data"),
                      ("model.context_length", "--context-length"), ("the batch size", "--batch")):
        message = message.replace(key, flag)
    return message


def perplexities(args: argparse.Namespace) -> dict:
    """The result JSON: `{"init", "data", "context_length", "stride", "val_ratio", "splits": {name: corpus_loss}}`."""
    import jax

    from jaxgpt.cli.generate import get_tokenizer, load_init
    from jaxgpt.data import make_splits, prepare_tokens
    from jaxgpt.text.token_bytes import token_byte_lengths
    from jaxgpt.train.perplexity import corpus_loss, first_windows

    config, params = load_init(args.init)
    tokenizer = get_tokenizer(config)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the model's tokenizer has {tokenizer.vocab_size:,} ids but its vocabulary only "
                        f"{config.vocab_size:,}: {args.init} and its tokenizer ({config.tokenizer}) do not match")
    context = args.context_length or config.context_length
    if context > config.context_length:
        raise UserError(f"--context-length {context} is longer than the model's context ({config.context_length})")
    try:
        with keys_as_flags(text_field="--text-field"):
            tokens = prepare_tokens(args.data, args.cache_dir, args.text_field, tokenizer=tokenizer)
        splits = make_splits(tokens, context, args.stride, args.val_ratio, name=repr(args.data), val_stride=args.stride)
        named = {"all": splits.train} if splits.val is None else {"train": splits.train, "val": splits.val}
        if args.max_windows:
            named = {name: first_windows(windows, args.max_windows) for name, windows in named.items()}
        devices = jax.local_device_count()
        batch = args.batch or -(-8 // devices) * devices
        byte_lengths = token_byte_lengths(tokenizer)
        losses = {name: corpus_loss(config, params, windows, batch_size=batch, progress=name,
                                    byte_lengths=byte_lengths)
                  for name, windows in named.items()}
    except UserError as e:
        raise UserError(_flags(str(e))) from None
    return {"init": args.init, "data": args.data, "context_length": context, "stride": args.stride or context,
            "val_ratio": args.val_ratio, "max_windows": args.max_windows, "splits": losses}


def report(result: dict) -> str:
    t, s = result["context_length"], result["stride"]
    lines = [f"{result['init']} on {result['data']}: windows of {t} tokens" + (f" every {s}" if s != t else ""),
             f"  {'split':<6} {'windows':>8} {'tokens':>11} {'loss':>8} {'perplexity':>11} {'bits/byte':>9}"]
    for name, split in result["splits"].items():
        bpb = f"{split['bits_per_byte']:>9.4f}" if "bits_per_byte" in split else f"{'n/a':>9}"
        lines.append(f"  {name:<6} {split['windows']:>8,} {split['tokens']:>11,} {split['loss']:>8.4f} "
                     f"{split['perplexity']:>11.3f} {bpb}")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    result = perplexities(args)
    print(report(result))
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + "\n", "the perplexity figures")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    main_entry(main)
