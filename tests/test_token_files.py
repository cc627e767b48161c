"""Token files (tokenize once, streaming, crash-safe; reuse by sha256) and the sources that
feed them: bundled corpora, text files and folders, TFDS (array_record, no TensorFlow)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jaxgpt.data import bundled as datasets
from jaxgpt.text import gpt2_bpe as tokenizer
from jaxgpt.config import DataConfig
from jaxgpt.data import load_splits, prepare_token_file, prepare_tokens
from jaxgpt.data import text as text_mod
from jaxgpt.errors import UserError

EOT = tokenizer.EOT_ID


# ---------------------------------------------------------------------------------------
# Token files


def test_bundled_registry():
    assert "the-verdict" in datasets.bundled_names("text")
    for name, entry in datasets.BUNDLED.items():
        path = datasets.bundled_path(name)
        if entry.sha256:
            assert datasets.file_sha256(path) == entry.sha256, name
    with pytest.raises(UserError, match="unknown bundled data set 'nope'"):
        datasets.bundled_path("nope")
    assert (datasets.DATA_DIR / "LICENSES.md").is_file()


def test_the_verdict_tokens_and_reuse(tmp_path, monkeypatch):
    toks = prepare_tokens("the-verdict", tmp_path)
    assert isinstance(toks, np.memmap) and toks.dtype == np.dtype("<u2") and len(toks) == 5145
    text = datasets.bundled_path("the-verdict").read_text(encoding="utf-8")
    np.testing.assert_array_equal(toks, tokenizer.encode(text))
    with pytest.raises((ValueError, OSError)):
        toks[0] = 1  # read-only
    (meta_path,) = tmp_path.glob("*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["tokens"] == 5145 and meta["dtype"] == "<u2" and meta["source"] == "bundled:the-verdict"

    def boom(*a, **k):
        raise AssertionError("re-tokenized although the cache is valid")

    bin_path = meta_path.with_suffix(".bin")
    mtime = bin_path.stat().st_mtime_ns
    monkeypatch.setattr(tokenizer, "encode_batch", boom)
    assert len(prepare_tokens("the-verdict", tmp_path)) == 5145
    assert bin_path.stat().st_mtime_ns == mtime


def test_cache_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "c"))
    path, n = prepare_token_file("the-verdict")
    assert path.parent == tmp_path / "c" / "tokens" and n == 5145


def test_changed_file_is_retokenized_and_leftovers_ignored(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Every effort moves you.\n")
    cache = tmp_path / "cache"
    path, n = prepare_token_file(str(corpus), cache)
    assert n == len(tokenizer.encode("Every effort moves you.\n"))
    # A leftover temp file from a killed run, and a truncated token file, are not trusted.
    (cache / (path.name + ".tmp-999-deadbeef")).write_bytes(b"\x00\x01" * 3)
    path.write_bytes(path.read_bytes()[:-2])
    _, n2 = prepare_token_file(str(corpus), cache)
    assert n2 == n and path.stat().st_size == 2 * n
    corpus.write_text("Every effort moves you, and more.\n")
    _, n3 = prepare_token_file(str(corpus), cache)
    assert n3 == len(tokenizer.encode("Every effort moves you, and more.\n")) != n


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("word \n" * 200)
    calls = []

    def flaky(texts, num_threads=4):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return [tokenizer.encode(t) for t in texts]

    monkeypatch.setattr(tokenizer, "encode_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_token_file(str(corpus), tmp_path / "cache", chunk_chars=64, num_threads=1)
    assert list((tmp_path / "cache").iterdir()) == []


def test_folder_corpus(tmp_path):
    root = tmp_path / "docs"
    (root / "a").mkdir(parents=True)
    (root / "z.txt").write_text("Last one.")
    (root / "a" / "c.txt").write_text("Second doc.\n")
    (root / "a" / "b.txt").write_text("First doc.")
    (root / "a" / "empty.txt").write_text("")
    (root / "notes.md").write_text("not a txt file")
    toks = prepare_tokens(str(root), tmp_path / "cache")
    e = tokenizer.encode
    expected = e("First doc.") + [EOT] + e("Second doc.\n") + [EOT] + e("Last one.")
    assert toks.tolist() == expected


def test_jsonl_and_gzip_corpora_and_folders_of_them(tmp_path):
    """Each line's data.text_field is a document (blank lines and empty texts skipped), .gz the
    same; another text field is another token file; a folder mixes .txt(.gz) and .jsonl(.gz)."""
    import gzip

    e = tokenizer.encode
    lines = [{"text": "First record.", "body": "b1"}, {"text": "", "body": "b2"}, {"text": "caf\u00e9\n<|endoftext|>x"}]
    body = "\n".join(json.dumps(r) for r in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n"
    (tmp_path / "c.jsonl").write_text(body)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    want = e("First record.") + [EOT] + e("caf\u00e9\n<|endoftext|>x")
    assert prepare_tokens(str(tmp_path / "c.jsonl"), tmp_path / "cache").tolist() == want
    assert prepare_tokens(str(tmp_path / "c.jsonl.gz"), tmp_path / "cache").tolist() == want
    two = tmp_path / "two.jsonl"
    two.write_text("\n".join(json.dumps(r) for r in lines[:2]))
    assert prepare_tokens(str(two), tmp_path / "cache", "body").tolist() == e("b1") + [EOT] + e("b2")
    assert prepare_tokens(str(two), tmp_path / "cache").tolist() == e("First record.")
    assert len(list((tmp_path / "cache").glob("two-*.bin"))) == 2  # one token file per text field
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("A text file.")
    (root / "b.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (root / "sub" / "c.txt.gz").write_bytes(gzip.compress("Gzipped\r\ntext.".encode()))  # universal newlines too
    (root / "sub" / "notes.md").write_text("not a corpus file")
    assert prepare_tokens(str(root), tmp_path / "cache").tolist() == (e("A text file.") + [EOT] + want + [EOT]
                                                                      + e("Gzipped\ntext."))
    assert prepare_tokens(str(root / "sub" / "c.txt.gz"), tmp_path / "cache").tolist() == e("Gzipped\ntext.")
    (tmp_path / "fake.txt.gz").write_text("not gzip")
    with pytest.raises(UserError, match="cannot read .*fake.txt.gz: Not a gzipped file"):
        prepare_tokens(str(tmp_path / "fake.txt.gz"), tmp_path / "cache")


def test_streaming_chunks_equal_one_shot(tmp_path):
    rnd = random.Random(0)
    parts = ["the", "Verdict", "naïve", "日本", "🙂", "1234", "'s", "<|endoftext|>", "!!", ",",
             " ", "  ", "\n", "\n\n", "\n\n\n", " \n", "\t", "\r\n", "   \n  "]
    text = "".join(rnd.choice(parts) for _ in range(6000))
    corpus = tmp_path / "big.txt"
    corpus.write_text(text, encoding="utf-8", newline="")
    expected = tokenizer.encode(corpus.read_text(encoding="utf-8"))  # universal newlines, as read
    for chunk in (16, 97, 1000):
        pieces = list(text_mod.read_text_chunks(corpus, chunk))
        assert len(pieces) > 3
        toks = prepare_tokens(str(corpus), tmp_path / f"cache{chunk}", chunk_chars=chunk, num_threads=2)
        assert toks.tolist() == expected, chunk
        pieces = list(text_mod.split_text(text, chunk))  # the same cuts on an in-memory string
        assert "".join(pieces) == text and len(pieces) > len(text) // (2 * chunk)
        assert sum(tokenizer.encode_batch(pieces), []) == tokenizer.encode(text)
    # Cutting after every newline instead (the obvious approach) would change the tokens:
    # "a\n\n" at a piece's end is [64, 628] but "a\n\nb" is [64, 198, 198, 65].
    assert tokenizer.encode("a\n\n") + tokenizer.encode("b") != tokenizer.encode("a\n\nb")


@pytest.mark.parametrize("kind", ["missing", "unknown-name", "empty-file", "blank-only", "no-txt", "not-utf8",
                                  "jsonl-no-field", "jsonl-not-text", "jsonl-bad-line"])
def test_source_errors(tmp_path, kind):
    if kind == "missing":
        spec, match = str(tmp_path / "nope.txt"), "neither a bundled corpus .*the-verdict"
    elif kind == "unknown-name":
        spec, match = "the-verdic", "neither a bundled corpus"
    elif kind == "empty-file":
        (tmp_path / "e.txt").write_text("")
        spec, match = str(tmp_path / "e.txt"), "is empty \\(0 tokens\\)"
    elif kind == "blank-only":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.txt").write_text("")
        spec, match = str(tmp_path / "d"), "is empty"
    elif kind == "no-txt":
        (tmp_path / "d").mkdir()
        spec, match = str(tmp_path / "d"), "has no .txt, .jsonl or .parquet files"
    elif kind.startswith("jsonl"):
        good = '{"text": "fine"}\n' * 3
        bad = {"jsonl-no-field": ('{"body": "x"}\n', r"line 1 has no field 'text' \(fields: body\); set data.text"),
               "jsonl-not-text": ('{"text": ["x"]}\n', "line 1: field 'text' is list, not text"),
               "jsonl-bad-line": (good + '{"text": "x"\n', "line 4 is not valid JSON")}[kind]
        (tmp_path / "c.jsonl").write_text(bad[0])
        spec, match = str(tmp_path / "c.jsonl"), bad[1]
    else:
        (tmp_path / "b.txt").write_bytes(b"ok \xff\xfe bad")
        spec, match = str(tmp_path / "b.txt"), "not UTF-8"
    with pytest.raises(UserError, match=match) as e:
        prepare_tokens(spec, tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else True  # no temporaries either


def test_a_full_disk_while_tokenizing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import builtins

    from jaxgpt.cli.tokenize import main
    from jaxgpt.data import tokens
    from tests.cli_helpers import HalfWrite

    monkeypatch.setattr(tokens, "open", lambda f, mode="r", *a, **k: HalfWrite(builtins.open(f, mode, *a, **k)),
                        raising=False)
    cache = tmp_path / "cache"
    assert main(["--data", "the-verdict", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full: could not write the corpus's token file (") and err.count("\n") == 1
    assert "no space left on device" in err and list(cache.iterdir()) == []  # no temporary left


def test_load_splits_from_config(tmp_path):
    s = load_splits(DataConfig(cache_dir=str(tmp_path)), 256)
    assert (len(s.train), len(s.val)) == (18, 2)
    with pytest.raises(UserError, match="corpus 'the-verdict' has 515 validation tokens"):
        load_splits(DataConfig(cache_dir=str(tmp_path)), 1024)


# ---------------------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow)


def test_tfds_the_verdict_end_to_end(tmp_path):
    import sys

    import tensorflow_datasets as tfds

    from jaxgpt.data import tfds_builders

    data_dir = str(tmp_path / "tfds")
    builder = tfds_builders.prepare_local("the_verdict", data_dir)
    assert builder.info.file_format.value == "array_record"
    src = tfds.data_source("the_verdict", split="train", data_dir=data_dir, download=False)
    text = datasets.bundled_path("the-verdict").read_text(encoding="utf-8")
    assert len(src) == 1 and src[0]["text"].decode("utf-8") == text
    toks = prepare_tokens("tfds:the_verdict", tmp_path / "cache", tfds_data_dir=data_dir)
    # One record holding the whole story, so no separators: identical to the file's tokens.
    np.testing.assert_array_equal(toks, prepare_tokens("the-verdict", tmp_path / "cache"))
    assert len(toks) == 5145
    assert "tensorflow" not in sys.modules

    with pytest.raises(UserError, match="no feature 'body'.*it has: text"):
        prepare_tokens("tfds:the_verdict", tmp_path / "cache", text_field="body", tfds_data_dir=data_dir)
    with pytest.raises(UserError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
        prepare_tokens("tfds:no_such_dataset_xyz", tmp_path / "cache", tfds_data_dir=data_dir)
    with pytest.raises(UserError, match="cannot open tfds dataset 'tfds:the_verdict:test'.*split"):
        prepare_tokens("tfds:the_verdict:test", tmp_path / "cache", tfds_data_dir=data_dir)


def test_tfds_multi_record_source(tmp_path):
    """Any array_record dataset: records are documents joined by <|endoftext|>."""
    import tensorflow_datasets as tfds

    from jaxgpt.data.tfds_source import parse_tfds_spec

    docs = ["First record.", "Second, with bytes: café.", "", "Third\n\nrecord "]

    class TinyDocs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # defined in a test function, no package path to look up

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()}),
                disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(docs):
                yield i, {"body": d}

    data_dir = str(tmp_path / "tfds")
    TinyDocs(data_dir=data_dir, file_format="array_record").download_and_prepare()
    assert parse_tfds_spec("tfds:tiny_docs") == ("tiny_docs", "train")
    assert parse_tfds_spec("tfds:wiki/en:1.0.0:train[:10%]") == ("wiki/en:1.0.0", "train[:10%]")
    toks = prepare_tokens("tfds:tiny_docs:train", tmp_path / "cache", text_field="body", tfds_data_dir=data_dir)
    e = tokenizer.encode
    assert toks.tolist() == e(docs[0]) + [EOT] + e(docs[1]) + [EOT] + e(docs[3])  # empty record skipped


def test_pretraining_data_for_trainer(tmp_path):
    from jaxgpt.config import Config, DataConfig, ModelConfig, TrainConfig
    from jaxgpt.data import pretraining_data

    cfg = Config(model=ModelConfig(context_length=256), data=DataConfig(cache_dir=str(tmp_path), seed=3),
                 train=TrainConfig(batch_size=4))
    data = pretraining_data(cfg)
    assert data.context_length == 256 and "18 train windows" in data.describe()
    b = data.train_batch(5)
    assert b["inputs"].shape == (4, 256) and b["inputs"].dtype == np.int32
    val = list(data.val_batches())
    assert len(val) == 1 and val[0]["mask"].sum() == 2 * 256  # 2 val windows, 2 padding rows
    half = pretraining_data(cfg, process_index=1, process_count=2)
    np.testing.assert_array_equal(half.train_batch(5)["inputs"], b["inputs"][2:])
    no_val = pretraining_data(Config(model=cfg.model, data=DataConfig(cache_dir=str(tmp_path), val_ratio=0.0),
                                     train=cfg.train))
    assert list(no_val.val_batches()) == []
