"""Score responses with a reward model trained by `python finetune.py reward`.

    python -m jaxgpt reward --init runs/rm --instruction "Name a color." --response "Blue." --response "Ugh, blue."

Prints one score a line, in the order of the `--response` flags (higher = preferred). Each
response is scored as the model was trained: `format_prompt(instruction, input)` + response +
<|endoftext|>, the score read at that end-of-text. A prompt longer than the model's context
is an error; a response that does not fit is truncated (as in training) with a note on stderr.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jaxgpt.cli.common import exit_on_user_error
from jaxgpt.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt reward", description=__doc__.split("\n")[0])
    parser.add_argument("--init", required=True, metavar="RUN",
                        help="a `finetune.py reward` run, or a Hugging Face one-score *ForSequenceClassification "
                             "folder or hub id")
    parser.add_argument("--instruction", required=True, help="the instruction (the prompt's task)")
    parser.add_argument("--input", default="", help="optional input for the instruction")
    parser.add_argument("--response", action="append", required=True,
                        help="a response to score (repeat for several)")
    return parser


def score_responses(run_dir: str, instruction: str, input: str,
                    responses: Sequence[str]) -> tuple[list[float], list[int]]:
    """`(scores, indices of truncated responses)` of `responses` to one prompt."""
    import jax
    import numpy as np

    from jaxgpt.data.preference import encode_example
    from jaxgpt.tasks.reward import load_reward_model, reward_scores
    from jaxgpt.text.tokenizer import tokenizer_of

    model_cfg, params = load_reward_model(run_dir, "--init")
    tokenizer = tokenizer_of(model_cfg)
    context = model_cfg.context_length
    rows, truncated = [], []
    for i, response in enumerate(responses):
        prompt, answer = encode_example(instruction, input, response, tokenizer)
        if len(prompt) >= context:
            raise UserError(f"the prompt is {len(prompt)} tokens; the reward model's context is {context}, "
                            "which leaves no room for a response; shorten --instruction/--input")
        if len(prompt) + len(answer) > context:
            truncated.append(i)
        rows.append((prompt + answer)[:context])
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    scores = jax.jit(reward_scores, static_argnums=0)(model_cfg, params, tokens, lengths)
    return [float(s) for s in np.asarray(scores)], truncated


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scores, truncated = score_responses(args.init, args.instruction, args.input, args.response)
    for i in truncated:
        print(f"note: response {i + 1} was truncated to the model's context", file=sys.stderr)
    for s in scores:
        print(f"{s:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
