"""Text while it is generated: tokens to the host as the decode loop samples them, incremental
detokenization and stop strings.

    stream = TextStream(tokenizer, stop=["\\n\\n"])
    for token in ids:                 # as the decode loop emits them
        print(stream.push(token), end="", flush=True)
        if stream.stopped:            # a stop string appeared: the loop can end this row
            break
    print(stream.finish())            # whatever was held back; stream.text is the whole answer

Decoding every prefix again would cost O(n^2), and decoding each token alone is wrong: a
byte-level token can hold half a UTF-8 character, and SentencePiece-style decoders drop the
leading space of the first token they see. So, as transformers' `TextStreamer` and vLLM's
detokenizer do, each step decodes the tokens since the last point where the text was
complete and keeps only what they add to the text before that point. The concatenated
pieces equal `tokenizer.decode(ids)` (`tests/test_streaming.py` checks GPT-2's BPE on
random ids, which split characters often, and a tokenizer.json).

Stop strings: text that could still be the start of a stop string is held back, so a stop
string is never shown; the text ends before it (`stream.text`), as Hugging Face's
`stop_strings` and the OpenAI API's `stop` do.

The tokens reach the host through `host_stop`, an `io_callback` inside the jitted loop
(`generate_tokens(on_token=...)`), and `text_sink` is the `on_token` that feeds one
TextStream a row.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxgpt.errors import UserError

# `generate_tokens(on_token=...)` registers its callable here under a fresh id, passed to the
# loop as a traced operand: one compiled program serves every callable (no recompilation per
# call or per chat turn), and concurrent calls do not mix their callbacks.
_SINKS: dict[int, Callable] = {}
_SINK_IDS = itertools.count(1)


@contextlib.contextmanager
def registered_sink(on_token: Callable | None) -> Iterator[int]:
    """The id the decode loop passes to `host_stop` for `on_token` (0: none), while in use."""
    sink = 0 if on_token is None else next(_SINK_IDS)
    if on_token is not None:
        _SINKS[sink] = on_token
    try:
        yield sink
    finally:
        _SINKS.pop(sink, None)


def _call_sink(sink, step, tokens, live) -> np.ndarray:
    stop = _SINKS[int(sink)](int(step), np.asarray(tokens), np.asarray(live))
    return np.broadcast_to(np.asarray(False if stop is None else stop, bool), tokens.shape).copy()


def host_stop(sink, step, tokens, live) -> jax.Array:
    """Inside the jitted loop: `on_token(step, tokens [batch], live [batch])` on the host, in
    step order. Its `[batch]` bool answer (rows to stop after this token) is the loop's next
    carry, so each call waits for the one before, and the loop for it."""
    return io_callback(_call_sink, jax.ShapeDtypeStruct(tokens.shape, jnp.bool_), sink, step, tokens, live)


def check_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """`stop` as a tuple, refusing an empty string (it would end every answer at once)."""
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise UserError(f"--stop strings must be non-empty text, got {list(stop)!r}")
    return stop


class TextStream:
    """One row's generated text, built token by token (see the module docstring).

    `push(token) -> str`: the text that is now safe to show (complete characters, none that
    could begin a stop string). `finish() -> str`: the rest, once no more tokens come.
    `text`: everything shown so far, which after `finish` is the whole answer: equal to
    `tokenizer.decode(ids)`, cut before the first stop string. `stopped`: a stop string was
    found; later tokens are ignored.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = check_stop_strings(stop)
        self.ids: list[int] = []
        self.stopped = False
        self._decoded = ""  # the text of ids[:self._read], complete characters only
        self._prefix = 0  # ids[self._prefix:self._read] are decoded again as context for the next ones
        self._read = 0
        self._shown = 0  # how much of self._decoded has been handed out

    @property
    def text(self) -> str:
        return self._decoded[:self._shown]

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self._catch_up(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._catch_up(final=True)
        return self._release(final=True)

    def _catch_up(self, final: bool) -> None:
        """Append what ids[self._read:] add to the text, unless it ends mid-character."""
        if self._read == len(self.ids):
            return
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if final or (len(after) > len(before) and not after.endswith("\ufffd")):
            self._decoded += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _release(self, final: bool) -> str:
        start, text = self._shown, self._decoded
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._decoded, self._shown, self.stopped = text[:cut], cut, True
            return text[start:cut]
        end = len(text) if final else len(text) - self._held_back(text, start)
        self._shown = max(start, end)
        return text[start:self._shown]

    def _held_back(self, text: str, start: int) -> int:
        """The longest end of `text` (after `start`) that a stop string begins with."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text) - start), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


def text_sink(streams: list[TextStream], eos_id: tuple[int, ...] | None, on_text=None) -> Callable:
    """An `on_token` for `generate_tokens` (what `generate` uses): each live row's token goes
    into its TextStream (an id of `eos_id` ends the row's text and is not part of it), each new piece of
    text to `on_text(row, piece)`, and the rows whose stop string appeared, or for which
    `on_text` returned True, are stopped."""

    def on_token(step, tokens, live):
        for row in np.flatnonzero(live):
            stream = streams[row]
            if eos_id is not None and tokens[row] in eos_id:
                piece = stream.finish()
                stream.stopped = True
            else:
                piece = stream.push(tokens[row])
            if piece and on_text is not None and on_text(int(row), piece):
                stream.stopped = True  # the caller ended the row: its text is what was shown
        return np.array([s.stopped for s in streams])

    return on_token


__all__ = ["TextStream", "check_stop_strings", "host_stop", "registered_sink", "text_sink"]
