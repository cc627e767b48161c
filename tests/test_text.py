"""Tokenizer objects (`jaxgpt.text.tokenizer`): GPT-2's through tiktoken, a model folder's
`tokenizer.json` through `tokenizers` (made here, offline), and token files in the smallest
unsigned dtype that holds the vocabulary."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from jaxgpt.errors import UserError
from jaxgpt.text import gpt2_bpe
from jaxgpt.text.tokenizer import GPT2Tokenizer, HFTokenizer, load_tokenizer, newline_counts

BIG_VOCAB = 70_000  # > 65,536: uint32 token files


def make_hf_tokenizer(folder, n_words: int = BIG_VOCAB, chat_template: str | None = None):
    """A word-level tokenizer.json with `n_words` words ("w0", ...) after the specials and "\\n", and
    its tokenizer_config.json (eos <|end|>, pad <|pad|>, bos <|begin|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    specials = ["<|begin|>", "<|end|>", "<|pad|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + ["\n"] + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(specials)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|end|>", "pad_token": "<|pad|>", "bos_token": "<|begin|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_gpt2_tokenizer_is_tiktokens():
    tok = load_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer) and tok is load_tokenizer("gpt2")
    text = "Hello, world<|endoftext|> again"
    assert tok.encode(text) == gpt2_bpe.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["a b", "c"]) == [gpt2_bpe.encode("a b"), gpt2_bpe.encode("c")]
    assert (tok.eos_id, tok.pad_id, tok.vocab_size, tok.token_dtype) == (50256, 50256, 50257, "<u2")
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template is None


def test_hf_tokenizer_folder(tmp_path):
    folder = make_hf_tokenizer(tmp_path / "tok", chat_template="{{ messages }}")
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == BIG_VOCAB + 5 and tok.token_dtype == "<u4"
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (1, 2, 0)
    assert tok.encode("w7 w69999<|end|>") == [12, BIG_VOCAB + 4, 1]  # special-token text is its id
    assert tok.encode("<|begin|>w7") == [0, 12]  # no begin-of-text unless the text has it
    assert tok.decode([12, 13]) == "w7 w8" and tok.chat_template == "{{ messages }}"
    assert tok.encode_batch(["w1", "w2 w3"]) == [[6], [7, 8]]


@pytest.mark.parametrize("files, words", [
    ({}, "no tokenizer.json"),
    ({"tokenizer.json": "{not json"}, "cannot read"),
])
def test_bad_tokenizer_folders_are_one_line_errors(tmp_path, files, words):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=words):
        HFTokenizer(tmp_path)
    with pytest.raises(UserError, match="neither gpt2 nor a folder"):
        load_tokenizer(str(tmp_path / "missing"))


def test_token_files_use_uint32_above_65536_ids(tmp_path):
    from jaxgpt.data.tokens import prepare_tokens

    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "tok")))
    corpus = tmp_path / "c.txt"
    corpus.write_text("w1 w69999 w70000\n", encoding="utf-8")  # w70000 is unknown
    tokens = prepare_tokens(str(corpus), tmp_path / "cache", tokenizer=tok)
    assert tokens.dtype == np.dtype("<u4") and tokens.tolist() == [6, BIG_VOCAB + 4, 3]
    meta = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert meta["dtype"] == "<u4" and meta["tokenizer"] == tok.name
    # GPT-2's token files keep the names (and so the caches) they always had.
    gpt2 = prepare_tokens(str(corpus), tmp_path / "cache")
    assert gpt2.dtype == np.dtype("<u2") and gpt2.tolist() == gpt2_bpe.encode(corpus.read_text())
    key = json.dumps([1, "gpt2", f"file:{corpus.resolve()}"])
    assert (tmp_path / "cache" / f"c-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin").is_file()


def test_newline_counts():
    counts = newline_counts(load_tokenizer("gpt2"))
    assert counts.shape == (50257,) and counts[gpt2_bpe.encode("\n")[0]] == 1 and counts[gpt2_bpe.encode("\n\n")[0]] == 2
