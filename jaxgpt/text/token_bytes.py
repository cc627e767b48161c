"""How many bytes of text each token id stands for, so that a loss can be put per byte
(bits per byte: comparable across tokenizers, where perplexity per token is not).

    lengths = token_byte_lengths(tokenizer)    # [vocab_size] int64, or None
    n_bytes = lengths[token_ids].sum()         # == len(text.encode("utf-8")) for token_ids = encode(text)

Exact for the kinds of tokenizer the model families use:
* GPT-2's BPE (tiktoken): each token's own bytes.
* byte-level BPE in `tokenizer.json` (the `ByteLevel` decoder: Llama 3, Qwen3): a token's
  characters are bytes mapped one to one onto printable characters, so its length.
* sentencepiece-style BPE with byte fallback (a decoder that replaces "▁" by a space and
  has `ByteFallback`: Gemma 3): `<0xNN>` is one byte, any other token its UTF-8 length with
  "▁" as a space. (A tokenizer that also prepends "▁" to its input, as Llama 2's does, counts
  that space: one byte more per encoded document.)
Special and added tokens (eos, chat markers, `<|endoftext|>` between documents) are markup,
not text: 0.
Other tokenizers (word-level, WordPiece, ...) decode with separators a token does not carry:
None, and callers report no per-byte figure.
"""
from __future__ import annotations

import json
import re

import numpy as np

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """`[vocab_size]` int64 UTF-8 byte lengths, one per id (see the module docstring), or None."""
    from jaxgpt.text.tokenizer import GPT2Tokenizer, HFTokenizer

    if isinstance(tokenizer, GPT2Tokenizer):
        encoding = tokenizer.encoding
        lengths = np.array([len(encoding.decode_single_token_bytes(i)) for i in range(tokenizer.vocab_size)])
    elif isinstance(tokenizer, HFTokenizer):
        lengths = _hf_lengths(tokenizer)
        if lengths is None:
            return None
    else:
        return None
    lengths[list(tokenizer.special_tokens.values())] = 0
    return lengths.astype(np.int64)


def _decoder_kind(decoder: dict | None) -> str | None:
    """"byte_level", "byte_fallback" (with "▁" as the space) or None."""
    if not decoder:
        return None
    if decoder.get("type") == "ByteLevel":
        return "byte_level"
    parts = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else []
    kinds = {d.get("type") for d in parts}
    spaces = any(d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581"
                 and d.get("content") == " " for d in parts)
    if "ByteLevel" in kinds:
        return "byte_level"
    return "byte_fallback" if "ByteFallback" in kinds and spaces else None


def _hf_lengths(tokenizer) -> np.ndarray | None:
    backend = tokenizer.backend
    kind = _decoder_kind(json.loads(backend.to_str()).get("decoder"))
    if kind is None:
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    lengths = np.zeros(max(tokenizer.vocab_size, max(vocab.values(), default=-1) + 1), np.int64)
    if kind == "byte_level":
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = set(ByteLevel.alphabet())
    for token, i in vocab.items():
        if kind == "byte_level":
            if not set(token) <= alphabet:  # an added token kept as text (not byte-mapped)
                lengths[i] = len(token.encode())
            else:
                lengths[i] = len(token)
        else:
            lengths[i] = 1 if _BYTE_TOKEN.fullmatch(token) else len(token.replace("\u2581", " ").encode())
    return lengths
