"""Classify texts with a fine-tuned run: `python -m jaxgpt classify --init RUN TEXT...`.

Prints one line per text: the most likely label and its probability, e.g. `spam 0.98`.
`--file F` reads one text per line (blank lines skipped) after any TEXT arguments. LoRA
runs are merged into plain weights first (`jaxgpt.models.lora.merge_lora`). RUN may also be a
Hugging Face `*ForSequenceClassification` folder (`python -m jaxgpt export` of a run writes one).
"""
from __future__ import annotations

import argparse
import sys

from jaxgpt.cli.common import exit_on_user_error, read_lines
from jaxgpt.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt classify", description=__doc__.split("\n")[0])
    parser.add_argument("--init", metavar="RUN", required=True,
                        help="a `finetune.py classify` run, a Hugging Face *ForSequenceClassification folder "
                             "or hub id, or a PEFT classifier (SEQ_CLS) adapter")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    parser.add_argument("--file", help="a UTF-8 file with one text per line")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    texts = list(args.texts)
    if args.file:
        texts += read_lines(args.file, "--file")
        if not texts:
            raise UserError(f"--file {args.file} has no texts (it is empty)")
    if not texts:
        raise UserError("nothing to classify: give TEXT arguments or --file")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")

    from jaxgpt.tasks.classify import load_classifier, predict

    model_cfg, params, labels, max_length = load_classifier(args.init)
    for label, prob in predict(model_cfg, params, labels, max_length, texts, args.batch_size):
        print(f"{label} {prob:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
