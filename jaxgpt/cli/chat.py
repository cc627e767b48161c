"""`python -m jaxgpt chat`: talk with an instruction-tuned model, its answers printed as they are decoded.

    python -m jaxgpt chat --init path/to/Qwen3-0.6B --no-thinking --temperature 0.7 --top-p 0.8
    python -m jaxgpt chat --init runs/sft --system "Answer in one sentence."
    printf 'Name a colour.\\nAnd another one?\\n' | python -m jaxgpt chat --init runs/sft

Each line read is the user's next message. A model with a chat template (Llama 3, Qwen3 and
Gemma 3 instruct folders, and runs fine-tuned from them) sees the whole conversation each
turn, rendered by its template as transformers' `apply_chat_template` renders it. The KV
cache is kept from turn to turn (`jaxgpt.generation.session.DecodeSession`): a turn prefills
only the tokens its prompt adds to the last one (the answer's end and the new message); the
answer is already in the cache, unless the template renders it otherwise (Qwen3 leaves an
earlier answer's <think> block out), where the cache is cut back to the shared prefix. When the
conversation and `--max-new-tokens` no longer fit in the model's context, the oldest
exchanges are left out of the prompt (said on stderr). A model without a template (GPT-2,
`finetune.py instruct` runs on it) was trained on single Alpaca prompts, so each message is
asked alone, as `generate --instruction` asks it.

`/reset` forgets the conversation, `/exit` or the end of input (Ctrl-D) ends the chat.
Ctrl-C ends the answer being written (what was written stays in the conversation); at the
prompt it ends the chat (exit code 130). Bad flags or weights are one line and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import threading
from typing import Any, Callable, Sequence

from jaxgpt.cli.common import exit_on_user_error, main_entry
from jaxgpt.cli.generate import Printer, add_sampling_args, get_tokenizer, load_init, stop_strings
from jaxgpt.errors import UserError

CHAT_BUCKET = 128  # where the session prefills whole (sliding windows): one compiled loop per this many tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxgpt chat",
        description="Chat with an instruction-tuned model (its chat template, else Alpaca); answers stream.",
    )
    parser.add_argument("--init", required=True, metavar="SPEC",
                        help="the model: a run directory, a Hugging Face model directory or a preset name")
    parser.add_argument("--system", metavar="TEXT", help="a system message, first in every prompt (chat templates)")
    parser.add_argument("--no-thinking", action="store_true",
                        help="render the template with enable_thinking=False (Qwen3: answer without a <think> "
                             "block)")
    add_sampling_args(parser, max_new_tokens=256)
    return parser


class Conversation:
    """The messages so far and the prompt for the next answer; no jax, so tests drive it.

    `prompt(message) -> (ids, new_tokens, left_out)`: the token ids the model sees before its
    answer to `message`, how many tokens it may write (`max_new_tokens`, or what the context
    leaves when the message alone is longer) and how many earlier exchanges did not fit.
    """

    def __init__(self, tokenizer, *, context_length: int, max_new_tokens: int, system: str | None = None,
                 thinking: bool = True):
        from jaxgpt.text.prompts import ChatFormat, prompt_format

        self.tokenizer, self.context, self.max_new = tokenizer, context_length, max_new_tokens
        self.format = prompt_format(tokenizer)
        self.chat = isinstance(self.format, ChatFormat)
        if self.chat and not thinking:
            self.format = ChatFormat(tokenizer, enable_thinking=False)
        if system is not None and not self.chat:
            raise UserError("--system needs a model with a chat template; this one is asked in the Alpaca format")
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict[str, str]] = []  # user and assistant messages, oldest first

    def prompt(self, message: str) -> tuple[list[int], int, int]:
        user = [{"role": "user", "content": message}]
        left_out = 0
        while True:
            kept = self.history[2 * left_out:]
            text = self.format.conversation(self.system + kept + user) if self.chat else self.format.prompt(message)
            ids = self.tokenizer.encode(text)
            if len(ids) + self.max_new <= self.context or not kept:
                break
            left_out += 1
        room = self.context - len(ids)
        if room < 1:
            raise UserError(f"the message makes a prompt of {len(ids)} tokens, no room to answer in the model's "
                            f"context of {self.context}; shorten it")
        return ids, min(self.max_new, room), left_out

    def add(self, message: str, answer: str) -> None:
        if self.chat:
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.history = []


def run_interruptibly(fn: Callable[[], Any], interrupt: threading.Event) -> Any:
    """`fn()` in a thread, so that Ctrl-C (delivered to this, the main thread, which only waits)
    sets `interrupt` instead of breaking into the decode loop; `fn` sees it through its
    `on_text` and ends the answer. fn's exception, if any, is raised here."""
    result: dict[str, Any] = {}
    finished = threading.Event()  # not thread.is_alive(): a join broken by Ctrl-C can make it read False early

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (raised again in the main thread)
            result["error"] = e
        finally:
            finished.set()

    threading.Thread(target=target, daemon=True).start()
    while True:
        try:
            if finished.wait(0.1):
                break
        except KeyboardInterrupt:
            interrupt.set()
    if "error" in result:
        raise result["error"]
    return result["value"]


def read_messages(stream=None):
    """User messages: `input()` with a `you> ` prompt at a terminal (line editing), else lines
    of stdin, echoed after `you> ` so the transcript reads as a conversation. Blank lines skipped."""
    stream = stream or sys.stdin
    tty = stream.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = input("you> ") if tty else stream.readline()
        except EOFError:
            return
        if not tty:
            if not line:
                return
            line = line.rstrip("\n")
            if line.strip():
                print(f"you> {line}")
        if line.strip():
            yield line.strip()


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    from jaxgpt.generation.decode import check_sampling_args, generate
    from jaxgpt.generation.session import DecodeSession

    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    stop = stop_strings(args)
    config, params = load_init(args.init)
    tokenizer = get_tokenizer(config)
    conversation = Conversation(tokenizer, context_length=config.context_length, max_new_tokens=args.max_new_tokens,
                                system=args.system, thinking=not args.no_thinking)
    if not conversation.chat:
        print("(no chat template: each message is asked alone, in the Alpaca format)", file=sys.stderr)
    session = DecodeSession(params, config)
    root = jax.random.key(args.seed)
    for turn, message in enumerate(read_messages()):
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            conversation.reset()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        try:
            ids, new_tokens, left_out = conversation.prompt(message)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if left_out:
            print(f"(the {left_out} oldest exchange(s) no longer fit in the context of {config.context_length} "
                  "tokens and are left out)", file=sys.stderr)
        interrupt = threading.Event()
        answer = run_interruptibly(lambda: generate(
            params, config, [ids], max_new_tokens=new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, key=jax.random.fold_in(root, turn),
            tokenizer=tokenizer, stop=stop, eos_id=getattr(tokenizer, "stop_ids", None),  # or the template's turn end
            on_text=Printer(skip_leading_space=True, interrupt=interrupt), prompt_bucket=CHAT_BUCKET,
            session=session)[0], interrupt)
        print(" [stopped]" if interrupt.is_set() else "")
        print()
        sys.stdout.flush()
        conversation.add(message, answer.strip())
    return 0


if __name__ == "__main__":
    main_entry(main)
