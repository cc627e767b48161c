"""UTF-8 text on disk, text cut where BPE cannot merge across the cut, and the `Source` record.

The bottom layer of `jaxgpt.data` (it imports only `jaxgpt.errors`): every reader above it
(JSON/CSV/TSV records, text corpora, tfds records) reads files and cuts text here, so a file
is decoded the same way and a corpus is cut at the same places whichever layer reads it.

Two ways of reading, on purpose:

* `read_text` (records: JSON, JSONL, CSV, TSV) keeps newlines as they are (`newline=""`) and
  gunzips `.gz`, because a record's bytes are its content (a CSV field may hold `\\r\\n`);
* `read_text_chunks` (corpora to tokenize) reads with universal newlines, as the book reads
  `the-verdict.txt`, and never holds the whole file: a corpus may be larger than memory;
  `jsonl_documents` reads a JSON Lines corpus a line (one document) at a time.
"""
from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from jaxgpt.errors import UserError

CHUNK_CHARS = 1 << 20  # text handed to the encoder per piece


# ---------------------------------------------------------------------------------------
# Whole files (records)


def open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text, transparently gunzipped for `.gz`, newlines untranslated."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_text(path: Path) -> str:
    try:
        with open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read data file {path}: {e}") from None


def text_lines(text: str) -> list[str]:
    """Lines split on \\n only (str.splitlines would also split inside a text on U+2028 etc.)."""
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


# ---------------------------------------------------------------------------------------
# Cutting text where BPE gives the same tokens either side


def _safe_cut(text: str, start: int) -> int:
    """Largest p >= start with text[p] whitespace and text[p-1] not, else -1.

    GPT-2's pre-tokenizer never joins a non-space character with the whitespace after it,
    and only *trailing* whitespace behaves differently at the end of a string (`\\s++$`:
    "a\\n\\n" ends in token 628, but "a\\n\\nb" has 198, 198). Cutting *before* a whitespace
    run that follows a non-space character therefore gives the same pre-tokens, hence the
    same tokens, as encoding the whole text at once. Newlines are preferred, then spaces.
    """
    for sep in ("\n", " "):
        p = len(text)
        while True:
            p = text.rfind(sep, start, p)
            if p <= 0:
                break
            if not text[p - 1].isspace():  # str.isspace covers every regex \s character
                return p
    return -1


_FORWARD_CUT = re.compile(r"(?<=\S)[\n ]")


def split_text(text: str, max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Pieces of `text` of about `max_chars`, cut as `_safe_cut` allows (longer where it can't)."""
    while len(text) > max_chars:
        p = _safe_cut(text[: max_chars + 1], 1)
        if p <= 0:
            m = _FORWARD_CUT.search(text, max_chars)
            if m is None:
                break
            p = m.start()
        yield text[:p]
        text = text[p:]
    if text:
        yield text


def read_text_chunks(path: Path, max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """A UTF-8 file as safe-cut pieces of ~`max_chars`, never holding the whole file.

    A file with no safe cut for `8 * max_chars` characters is cut there anyway (the tokens
    at that one seam may then differ from one-shot encoding; real text never does this).
    """
    carry = ""
    try:  # universal newlines, as the book reads it; a .gz file gunzipped on the way
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            while True:
                block = f.read(max_chars)
                if not block:
                    break
                carry += block
                if len(carry) <= max_chars:
                    continue
                p = _safe_cut(carry, 1)
                if p <= 0 and len(carry) >= 8 * max_chars:
                    p = len(carry)
                if p > 0:
                    yield carry[:p]
                    carry = carry[p:]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    except (OSError, EOFError) as e:  # gzip's "not a gzipped file" / a truncated one too
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if carry:
        yield carry


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")  # corpora of one JSON object a line, its `data.text_field` a document


TEXT_SUFFIXES = (".txt", ".txt.gz")  # plain-text documents in a corpus folder


def is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(JSONL_SUFFIXES)


def is_text(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES)


def jsonl_documents(path: Path, text_field: str, max_chars: int = CHUNK_CHARS) -> Iterator[Iterator[str]]:
    """Each record's `text_field` of a JSON Lines corpus (`.jsonl`, `.jsonl.gz`) as one document
    of safe-cut pieces, read a line at a time (blank lines skipped), so the file may be larger
    than memory. A line that is not a JSON object holding that text is a one-line error."""
    n = 0
    try:
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n} is not valid JSON ({e.msg}, column {e.colno}); a .jsonl "
                                    "corpus holds one JSON object a line") from None
                if not isinstance(record, dict) or text_field not in record:
                    have = f"fields: {', '.join(sorted(record))}" if isinstance(record, dict) else type(record).__name__
                    raise UserError(f"{path} line {n} has no field {text_field!r} ({have}); set data.text_field")
                text = record[text_field]
                if not isinstance(text, str):
                    raise UserError(f"{path} line {n}: field {text_field!r} is {type(text).__name__}, not text; "
                                    "set data.text_field")
                yield split_text(text, max_chars)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (line {n + 1}, byte {e.start} of it); convert it to UTF-8") from None
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------------------------------
# Corpus sources


@dataclass
class Source:
    """A resolved corpus: a stable key (names the cache file), a fingerprint of its current
    contents, and a factory for its documents (each an iterable of text pieces).

    Made by `jaxgpt.data.tokens.resolve_source` (bundled, file, folder) and
    `jaxgpt.data.tfds_source.tfds_source` (`tfds:`); consumed by the token cache."""

    spec: str  # as the user wrote it
    key: str  # canonical identity, e.g. "file:/abs/path"
    slug: str  # readable part of the cache file name
    fingerprint: dict
    documents: Callable[[], Iterable[Iterable[str]]] = field(repr=False)


def slugify(text: str) -> str:
    """`text` as a short, file-name-safe word (the readable part of a cache file name)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:48] or "corpus"
