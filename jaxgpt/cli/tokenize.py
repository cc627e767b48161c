"""`python -m jaxgpt tokenize`: text <-> token ids, and a corpus tokenized ahead of training.

    python -m jaxgpt tokenize "Hello, do you like tea?"        # 15496 11 466 345 588 8887 30
    python -m jaxgpt tokenize --pieces "Hello, do you like tea?"
    python -m jaxgpt tokenize --decode 15496 11 466 345 588 8887 30
    python -m jaxgpt tokenize --data corpus/ --context-length 256 --stride 128 --show 2

`--tokenizer` is `gpt2` (the default: GPT-2's BPE, offline), a folder with `tokenizer.json`
(a Hugging Face model or tokenizer folder), or a jaxgpt run directory (its model's tokenizer).
`--data` writes the corpus's token file into the cache that `train.py` and `perplexity` read
(`jaxgpt.data.tokens.prepare_token_file`: the same file, reused while the corpus is
unchanged), so a large corpus can be tokenized once, on another machine or before a run; with
`--context-length` it also counts the sliding windows of each split, as training cuts them,
and `--show N` prints the first N (inputs and their next-token targets).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from jaxgpt.cli.common import exit_on_user_error, keys_as_flags
from jaxgpt.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxgpt tokenize", description=__doc__.split("\n")[0])
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to encode (one line of ids each)")
    p.add_argument("--tokenizer", default="gpt2", metavar="SPEC",
                   help="gpt2 (default), a folder with tokenizer.json, or a jaxgpt run directory")
    p.add_argument("--pieces", action="store_true", help="print each token as `id<TAB>piece` instead")
    p.add_argument("--decode", nargs="+", type=int, metavar="ID", help="token ids to decode into text")
    p.add_argument("--data", metavar="SOURCE", help="a corpus to tokenize into the cache (as data.path)")
    p.add_argument("--cache-dir", default="", metavar="DIR", help="token cache (data.cache_dir; default: "
                   "$JAXGPT_CACHE/tokens or ~/.cache/jaxgpt/tokens)")
    p.add_argument("--text-field", default="text", metavar="FIELD",
                   help="the text field of a .jsonl or .parquet corpus or tfds source (data.text_field)")
    p.add_argument("--context-length", type=int, default=0, metavar="T", help="count the windows of T tokens")
    p.add_argument("--stride", type=int, default=0, metavar="S", help="windows start every S tokens (0: T)")
    p.add_argument("--val-ratio", type=float, default=0.1, metavar="R",
                   help="the last R of the tokens are the validation split (data.val_ratio; default 0.1)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N training windows")
    return p


def tokenizer_for(spec: str):
    """The tokenizer of `--tokenizer SPEC` (see the module docstring), without loading weights."""
    from jaxgpt.text.tokenizer import load_tokenizer

    path = Path(spec).expanduser()
    if (path / "config.yaml").is_file():  # a run: its model.tokenizer (gpt2, or its own copy)
        from jaxgpt.io.checkpoint import read_run_sections
        from jaxgpt.io.hub import ModelSection

        return load_tokenizer(read_run_sections(path, ModelSection).model.tokenizer)
    if (path / "config.json").is_file():  # a Hugging Face model: GPT-2 keeps tiktoken, as `--init` does
        from jaxgpt.io.hf_load import read_json

        if read_json(path / "config.json").get("model_type", "gpt2") == "gpt2":
            return load_tokenizer("gpt2")
    if spec == "gpt2" or (path / "tokenizer.json").is_file():
        return load_tokenizer(spec)
    if path.is_dir():
        raise UserError(f"--tokenizer {spec}: the folder has no tokenizer.json (nor is it a jaxgpt run)")
    raise UserError(f"--tokenizer {spec} is neither gpt2, a folder with tokenizer.json, nor a jaxgpt run directory")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:,.1f} KiB"


def _ids(values, limit: int = 16) -> str:
    shown = " ".join(str(int(v)) for v in values[:limit])
    return shown + (f" ... ({len(values)} ids)" if len(values) > limit else "")


def describe_corpus(args: argparse.Namespace, tokenizer) -> list[str]:
    """Tokenize `--data` into the cache; lines saying what was written and, with
    `--context-length`, the windows of each split."""
    import numpy as np

    from jaxgpt.data import make_splits
    from jaxgpt.data.tokens import prepare_token_file

    with keys_as_flags(text_field="--text-field"):
        path, n = prepare_token_file(args.data, args.cache_dir, args.text_field, tokenizer=tokenizer)
    lines = [f"{args.data}: {n:,} tokens ({tokenizer.name}, {np.dtype(tokenizer.token_dtype).name}) -> {path} "
             f"({_size(path.stat().st_size)})"]
    if not args.context_length:
        return lines
    tokens = np.memmap(path, dtype=tokenizer.token_dtype, mode="r", shape=(n,))
    splits = make_splits(tokens, args.context_length, args.stride, args.val_ratio, name=repr(args.data))
    t, s = args.context_length, args.stride or args.context_length
    val = f", val {len(splits.val):,} (stride {t})" if splits.val is not None else ", no val split"
    lines.append(f"windows of {t} tokens: train {len(splits.train):,} (stride {s}){val}")
    for i in range(min(args.show, len(splits.train))):
        inputs, targets = splits.train[i]
        lines += [f"train window {i} (tokens {i * s}..{i * s + t}):", f"  inputs  {_ids(inputs)}",
                  f"  targets {_ids(targets)}", f"  text    {tokenizer.decode(inputs.tolist())!r}"]
    return lines


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.texts or args.decode or args.data):
        parser.error("give TEXT to encode, --decode IDS or --data SOURCE")
    for flag in ("context_length", "stride", "show"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if (args.context_length or args.show) and not args.data:
        raise UserError("--context-length and --show count the windows of a corpus: give --data SOURCE")
    if args.show and not args.context_length:
        raise UserError("--show prints windows: give --context-length T")
    tokenizer = tokenizer_for(args.tokenizer)
    for text in args.texts:
        ids = tokenizer.encode(text)
        if args.pieces:
            print("\n".join(f"{i}\t{tokenizer.decode([i])!r}" for i in ids))
        else:
            print(" ".join(map(str, ids)))
    if args.decode:
        bad = [i for i in args.decode if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise UserError(f"--decode: id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})")
        print(tokenizer.decode(list(args.decode)))
    if args.data:
        print("\n".join(describe_corpus(args, tokenizer)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
