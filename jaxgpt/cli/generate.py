"""`python -m jaxgpt generate`: continue prompts with a trained or pretrained model.

    python -m jaxgpt generate --init runs/my-run --prompt "Every effort moves you"
    python -m jaxgpt generate --init runs/my-run --prompt-file prompts.txt \\
        --max-new-tokens 100 --temperature 0.8 --top-k 50 --seed 1
    python -m jaxgpt generate --init runs/sft --instruction "Rewrite the sentence in passive voice." \\
        --input "The chef cooks the meal."

Each prompt's continuation is printed as prompt + generated text, prompts separated by a
blank line. All prompts run as one left-padded batch through `jaxgpt.generation.decode.generate`.
`--stream` prints the text as it is decoded (one prompt); `--stop TEXT` ends each text before
TEXT's first appearance and stops that row's decoding there.
With `--instruction` (and optionally `--input`) the prompt is the model's format
(`jaxgpt.text.prompts.prompt_format`: its chat template, else Alpaca), the format `finetune.py
instruct` trains on, and only the response is printed (the text generated after the prompt, up to `<|endoftext|>`).
A LoRA fine-tuning run is merged with its own `lora` section first.
Bad input (a missing run directory, out-of-range values, a prompt too long for the context)
is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from jaxgpt.cli.common import exit_on_user_error, main_entry, read_lines
from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError


def load_init(spec: str) -> tuple[ModelConfig, Any]:
    """`--init` -> (ModelConfig, plain params) through `jaxgpt.io.hub.resolve_init`: run
    directories (a LoRA run comes merged with its own alpha), Hugging Face or OpenAI
    directories, and preset names like "gpt2". A model with no LM head (an untied classifier
    or reward model: its `score` head replaced it) is one line, not a traceback mid-way."""
    from jaxgpt.io.hf_export import score_classes
    from jaxgpt.io.hub import resolve_init

    config, params = resolve_init(spec)
    if not config.tie_embeddings and "lm_head" not in params:
        kind = {0: "a model without one", 1: "a reward model"}.get(score_classes(params), "a classifier")
        raise UserError(f"--init {spec} has no language-model head (lm_head): it is {kind}; give a language model")
    return config, params


def get_tokenizer(config: ModelConfig):
    """The model's tokenizer (`model.tokenizer`: GPT-2's BPE unless it names another); a
    function so tests can swap it."""
    from jaxgpt.text.tokenizer import tokenizer_of

    return tokenizer_of(config)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; other commands (instruction prompts, ...) extend it."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxgpt generate",
        description="Generate text continuations from a model (KV-cached, batched, jitted).",
    )
    parser.add_argument("--init", required=True, metavar="SPEC",
                        help="weights to load: a training run directory (its latest checkpoint), "
                             "or a Hugging Face model directory / preset name such as gpt2")
    src = parser.add_argument_group("prompts (at least one; all run as one batch)")
    src.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="a prompt to continue (repeatable)")
    src.add_argument("--prompt-file", metavar="FILE",
                     help="a UTF-8 text file with one prompt per line (blank lines skipped)")
    src.add_argument("--instruction", metavar="TEXT",
                     help="ask an instruction-tuned model (finetune.py instruct): TEXT in the model's chat "
                          "template (else the Alpaca prompt); only the response is printed")
    src.add_argument("--input", metavar="TEXT", default="",
                     help="the instruction's input (optional; with --instruction)")
    smp = add_sampling_args(parser, max_new_tokens=50)
    smp.add_argument("--ignore-eos", action="store_true",
                     help="keep generating past <|endoftext|> instead of stopping there")
    out = parser.add_argument_group("output")
    out.add_argument("--stream", action="store_true",
                     help="print the text as it is generated (one prompt)")
    return parser


def add_sampling_args(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> argparse._ArgumentGroup:
    """The sampling flags `generate` and `chat` share, as an argument group."""
    smp = parser.add_argument_group("sampling")
    smp.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                     help=f"tokens to generate per prompt (default: {max_new_tokens})")
    smp.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="0 = greedy (default); e.g. 0.8 for varied text")
    smp.add_argument("--top-k", type=int, default=None, metavar="K",
                     help="sample only from the K most likely tokens")
    smp.add_argument("--top-p", type=float, default=None, metavar="P",
                     help="nucleus sampling: the smallest set of tokens with probability >= P, in (0, 1]")
    smp.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                     help="make the ids already in the text (prompt included) less likely, as transformers' "
                          "repetition_penalty: R > 1, e.g. 1.2 (default: none)")
    smp.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    smp.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="end the text before TEXT's first appearance (repeatable; \\n and \\t in TEXT are a "
                          "newline and a tab, e.g. --stop '\\n\\n')")
    return smp


def stop_strings(args: argparse.Namespace) -> list[str]:
    """`--stop` values with `\\n` / `\\t` read as newline / tab (shells pass them literally)."""
    from jaxgpt.generation.stream import check_stop_strings

    return list(check_stop_strings([s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]))


def read_prompts(args: argparse.Namespace) -> list:
    """The prompts named by `--prompt` and `--prompt-file`, in that order; or, for
    `--instruction`, the one `(instruction, input)` pair (made into the model's prompt format
    once the model, and so its tokenizer, is loaded)."""
    if args.instruction is not None:
        if args.prompt or args.prompt_file:
            raise UserError("--instruction builds the prompt itself; give it without --prompt / --prompt-file")
        if not args.instruction.strip():
            raise UserError("--instruction is empty")
        return [(args.instruction, args.input)]  # made into the model's prompt once it is loaded
    if args.input:
        raise UserError("--input goes with --instruction")
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += read_lines(args.prompt_file, "--prompt-file")
    if not prompts:
        raise UserError("no prompt given; use --prompt TEXT or --prompt-file FILE")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise UserError(f"prompt {empty[0] + 1} is empty")
    return prompts


class Printer:
    """An `on_text` for `generate`: each piece to stdout as it comes (an answer's leading
    whitespace dropped, as the printed answers are stripped). With `interrupt` (chat's
    Ctrl-C), it answers True, ending the row, once the event is set."""

    def __init__(self, skip_leading_space: bool = False, interrupt=None):
        self.started, self.interrupt = not skip_leading_space, interrupt

    def show(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    def __call__(self, row: int, text: str) -> bool:
        self.show(text)
        return self.interrupt is not None and self.interrupt.is_set()


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxgpt.generation.decode import check_sampling_args, generate

    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    stop = stop_strings(args)
    prompts = read_prompts(args)
    if args.stream and len(prompts) > 1:
        raise UserError(f"--stream prints one prompt's text as it comes; got {len(prompts)} prompts")
    config, params = load_init(args.init)
    tokenizer = get_tokenizer(config)
    if args.instruction is not None:  # the model's own format: its chat template, else Alpaca
        from jaxgpt.text.prompts import prompt_format

        prompts = [prompt_format(tokenizer).prompt(*prompts[0])]
    on_text = None
    if args.stream:
        on_text = Printer(skip_leading_space=args.instruction is not None)
        if args.instruction is None:
            on_text.show(prompts[0])
    texts = generate(
        params, config, prompts,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop_at_eos=not args.ignore_eos, tokenizer=tokenizer,
        # in the chat format an answer also ends at the template's end of an answer
        eos_id=getattr(tokenizer, "stop_ids", None) if args.instruction is not None else None,
        stop=stop, on_text=on_text, repetition_penalty=args.repetition_penalty,
    )
    if args.stream:
        print()
        sys.stdout.flush()
        return 0
    if args.instruction is not None:
        print(texts[0].strip())  # the response only: what follows the prompt, cut at <|endoftext|>
        sys.stdout.flush()
        return 0
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if i:
            print()
        print(prompt + text)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    main_entry(main)
