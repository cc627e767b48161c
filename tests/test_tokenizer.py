"""The offline GPT-2 tokenizer equals tiktoken's "gpt2" encoding, and fails clearly."""
from __future__ import annotations

import socket

import pytest
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

from jaxgpt.text import gpt2_bpe as tokenizer
from jaxgpt.data.bundled import bundled_path
from jaxgpt.errors import UserError


@pytest.fixture(scope="module")
def enc():
    return tokenizer.get_encoding()


def _tiktoken_ranks_from_local_files(monkeypatch):
    """tiktoken's own loader on the local files; TIKTOKEN_CACHE_DIR="" makes it read directly."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    vocab_bpe, encoder_json = tokenizer.bpe_file_paths()

    def local(vocab_bpe_file, encoder_json_file, vocab_bpe_hash=None, encoder_json_hash=None, **kw):
        # The hashes tiktoken's gpt2() asks for are the ones we check.
        assert vocab_bpe_hash == tokenizer.VOCAB_BPE_SHA256
        assert encoder_json_hash == tokenizer.ENCODER_JSON_SHA256
        assert vocab_bpe_file.endswith("/vocab.bpe") and encoder_json_file.endswith("/encoder.json")
        return tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe), str(encoder_json), vocab_bpe_hash, encoder_json_hash, **kw
        )

    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", local)
    return openai_public.gpt2()


def test_same_definition_as_tiktoken_gpt2(enc, monkeypatch):
    ref = _tiktoken_ranks_from_local_files(monkeypatch)
    assert enc.name == ref["name"] == "gpt2"
    assert enc._pat_str == ref["pat_str"] == tokenizer.PAT_STR == openai_public.r50k_pat_str
    assert enc._special_tokens == ref["special_tokens"] == {"<|endoftext|>": 50256}
    assert enc.n_vocab == ref["explicit_n_vocab"] == 50257
    assert enc._mergeable_ranks == ref["mergeable_ranks"]
    assert enc.eot_token == tokenizer.EOT_ID == 50256


def test_builds_without_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ranks = tokenizer.load_mergeable_ranks()
    assert len(ranks) == 50256


def test_known_encodings(enc):
    assert tokenizer.get_encoding() is enc  # cached
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    # The book's ch. 2 example (tiktoken gpt2 output printed there).
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
           8812, 2114, 286, 617, 34680, 27271, 13]
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_unicode_round_trip():
    text = "naïve café — 日本語テキスト, emoji 🙂🚀, Ελληνικά, \t tabs\n\nand  spaces  "
    ids = tokenizer.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, "Hello, world"]) == [ids, [15496, 11, 995]]


def test_the_verdict_token_count():
    text = bundled_path("the-verdict").read_text(encoding="utf-8")
    assert len(tokenizer.encode(text)) == 5145


def test_corrupted_or_missing_file_names_it(tmp_path):
    vocab_bpe, encoder_json = tokenizer.bpe_file_paths()
    bad = tmp_path / "vocab.bpe"
    blob = bytearray(vocab_bpe.read_bytes())
    blob[100] ^= 1
    bad.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=str(bad)) as e:
        tokenizer.load_mergeable_ranks(bad, encoder_json)
    assert "corrupted" in str(e.value) and "\n" not in str(e.value)
    missing = tmp_path / "encoder.json"
    with pytest.raises(UserError, match=f"{missing}.*missing"):
        tokenizer.load_mergeable_ranks(vocab_bpe, missing)
