"""`jaxgpt.text.token_bytes.token_byte_lengths`: summed over the ids of any text, the UTF-8
length of that text (special tokens 0), for the three kinds of tokenizer the model families
use: GPT-2's tiktoken BPE, byte-level BPE (Llama 3, Qwen3) and sentencepiece-style BPE with
byte fallback (Gemma 3), the last two built here with the `tokenizers` library; texts with
accents, CJK and emoji that the small vocabularies split into single bytes."""
from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from jaxgpt.data.bundled import bundled_path
from jaxgpt.text.token_bytes import token_byte_lengths
from jaxgpt.text.tokenizer import HFTokenizer, load_tokenizer
from tests.test_text import make_hf_tokenizer

TEXTS = ["the cat sat on the mat", "naïve café — 日本語 🙂, twice: 🙂!\n\nnew line", "  spaced   out  "]


def _folder(tmp_path, tok: Tokenizer):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    return HFTokenizer(tmp_path)


def _check(tokenizer, texts):
    lengths = token_byte_lengths(tokenizer)
    assert lengths is not None and len(lengths) == tokenizer.vocab_size
    for text in texts:
        ids = tokenizer.encode(text + "<|end|>" if tokenizer.name != "gpt2" else text + "<|endoftext|>")
        assert lengths[ids].sum() == len(text.encode("utf-8")), text
    assert lengths[tokenizer.eos_id] == 0


def test_gpt2_bpe():
    _check(load_tokenizer("gpt2"), TEXTS + [bundled_path("the-verdict").read_text(encoding="utf-8")])


def test_byte_level_bpe(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat, the end"] * 4, trainer)
    _check(_folder(tmp_path, tok), TEXTS)


def test_byte_fallback_bpe(tmp_path):
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "\u2581": 257}
    vocab.update({c: 258 + i for i, c in enumerate(letters)})
    vocab.update({"\u2581t": 284, "he": 285, "\u2581the": 286})
    bpe = models.BPE(vocab, [("\u2581", "t"), ("h", "e"), ("\u2581t", "he")], unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<|end|>"])
    tokenizer = _folder(tmp_path, tok)
    assert tokenizer.decode(tokenizer.encode(TEXTS[1])) == TEXTS[1]  # the bytes come back whole
    assert {tokenizer.backend.id_to_token(i) for i in tokenizer.encode("é")} == {"<0xC3>", "<0xA9>"}  # bytes
    _check(tokenizer, TEXTS)


def test_word_level_has_none(tmp_path):
    assert token_byte_lengths(load_tokenizer(str(make_hf_tokenizer(tmp_path / "words", n_words=20)))) is None
