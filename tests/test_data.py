"""Token files, windows, batches and the TFDS source (CPU, offline, a few seconds)."""
from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxgpt.data as data_pkg
from jaxgpt.data import bundled as datasets
from jaxgpt.text import gpt2_bpe as tokenizer
from jaxgpt.config import DataConfig
from jaxgpt.data import (
    BatchSampler,
    Windows,
    eval_batches,
    load_splits,
    make_splits,
    num_eval_batches,
    prepare_token_file,
    prepare_tokens,
    split_tokens,
)
from jaxgpt.data import text as text_mod
from jaxgpt.errors import UserError

EOT = tokenizer.EOT_ID


def _book_windows(ids, t, stride):
    """Raschka's GPTDatasetV1 loop, verbatim in numpy."""
    xs, ys = [], []
    for i in range(0, len(ids) - t, stride):
        xs.append(ids[i : i + t])
        ys.append(ids[i + 1 : i + t + 1])
    return np.array(xs, dtype=np.int32).reshape(-1, t), np.array(ys, dtype=np.int32).reshape(-1, t)


# ---------------------------------------------------------------------------------------
# Windows and splits


def test_windows_hand_computed():
    toks = np.arange(10, dtype=np.uint16)
    w = Windows(toks, context_length=4, stride=4)
    assert len(w) == 2  # starts 0 and 4; start 8 would need tokens up to 12
    b = w.take([0, 1])
    np.testing.assert_array_equal(b["inputs"], [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(b["targets"], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert b["inputs"].dtype == np.int32
    w = Windows(toks, context_length=3, stride=2)
    assert len(w) == 4  # starts 0, 2, 4, 6
    x, y = w[3]
    np.testing.assert_array_equal(x, [6, 7, 8])
    np.testing.assert_array_equal(y, [7, 8, 9])
    assert len(Windows(toks, 9, 1)) == 1 and len(Windows(toks, 10, 1)) == 0
    with pytest.raises(IndexError):
        w.take([4])


@pytest.mark.parametrize("n,t,s", [(50, 4, 1), (50, 4, 3), (50, 7, 7), (51, 7, 7), (8, 7, 2), (100, 10, 13)])
def test_windows_match_book(n, t, s):
    ids = np.random.default_rng(n).integers(0, 50257, n).astype(np.uint16)
    w = Windows(ids, t, s)
    bx, by = _book_windows(ids, t, s)
    assert len(w) == len(bx)
    got = w.take(np.arange(len(w)))
    np.testing.assert_array_equal(got["inputs"], bx)
    np.testing.assert_array_equal(got["targets"], by)


def test_split_sizes_and_stride_zero():
    toks = np.arange(5145, dtype=np.uint16)
    tr, va = split_tokens(toks, 0.1)
    assert (len(tr), len(va)) == (4630, 515)
    assert tr[-1] + 1 == va[0]  # contiguous: train is the start of the stream
    s = make_splits(toks, 256, stride=0, val_ratio=0.1)
    assert s.train.stride == 256 and (len(s.train), len(s.val)) == (18, 2)  # as in the book, ch. 5
    s = make_splits(toks, 256, stride=128, val_ratio=0.0)
    assert s.val is None and len(s.train) == (5145 - 257) // 128 + 1


def test_too_short_corpus_message():
    toks = np.zeros(5145, dtype=np.uint16)
    with pytest.raises(UserError) as e:
        make_splits(toks, 4630, val_ratio=0.1, name="the-verdict")
    msg = str(e.value)
    assert "the-verdict has 4,630 train tokens" in msg and "context_length+1=4,631" in msg
    assert "model.context_length" in msg and "\n" not in msg
    with pytest.raises(UserError, match="515 validation tokens.*val_ratio"):
        make_splits(toks, 1024, val_ratio=0.1)


# ---------------------------------------------------------------------------------------
# Training batches


@pytest.fixture
def windows():
    return Windows(np.arange(1000, dtype=np.uint16), context_length=8, stride=8)  # 124 windows


def test_shuffle_determinism(windows):
    a, b = BatchSampler(windows, 16, seed=3), BatchSampler(windows, 16, seed=3)
    c = BatchSampler(windows, 16, seed=4)
    np.testing.assert_array_equal(a.indices(5), b.indices(5))
    assert not np.array_equal(a.indices(0), c.indices(0))
    plain = BatchSampler(windows, 16, shuffle=False)
    np.testing.assert_array_equal(plain.indices(1), np.arange(16, 32))


def test_each_epoch_is_a_permutation(windows):
    s = BatchSampler(windows, 10, seed=0)
    w = len(windows)
    stream = np.concatenate([s.indices(n) for n in range(3 * w // 10 + 1)])
    for e in range(3):
        assert sorted(stream[e * w : (e + 1) * w]) == list(range(w))
    assert not np.array_equal(stream[:w], stream[w : 2 * w])  # reshuffled per epoch


def test_batch_n_is_resumable(windows):
    s = BatchSampler(windows, 16, seed=7)
    first = [b for _, b in zip(range(12), s.iterate())]
    resumed = BatchSampler(windows, 16, seed=7)  # a fresh process, resuming at step 9
    for n, b in zip(range(9, 12), resumed.iterate(start=9)):
        for k in ("inputs", "targets"):
            np.testing.assert_array_equal(b[k], first[n][k])
    np.testing.assert_array_equal(resumed.batch(3)["inputs"], first[3]["inputs"])
    assert first[0]["inputs"].shape == (16, 8) and first[0]["inputs"].dtype == np.int32
    np.testing.assert_array_equal(first[0]["targets"][:, :-1], first[0]["inputs"][:, 1:])


def test_fewer_windows_than_batch():
    w = Windows(np.arange(40, dtype=np.uint16), 8, 8)  # 4 windows
    s = BatchSampler(w, 10, seed=1)
    b = s.batch(0)
    assert b["inputs"].shape == (10, 8)
    idx = np.concatenate([s.indices(n) for n in range(2)])  # 20 positions = 5 full epochs
    assert np.bincount(idx, minlength=4).tolist() == [5, 5, 5, 5]
    assert s.epoch(2) == 5.0


def test_process_sharding_union_is_global_batch(windows):
    glob = BatchSampler(windows, 12, seed=5)
    for n in (0, 11, 30):
        parts = [BatchSampler(windows, 12, seed=5, process_index=p, process_count=4).batch(n) for p in range(4)]
        assert parts[0]["inputs"].shape == (3, 8)
        for k in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), glob.batch(n)[k])
    with pytest.raises(UserError, match="not divisible by the 5 processes"):
        BatchSampler(windows, 12, process_index=0, process_count=5)


# ---------------------------------------------------------------------------------------
# Evaluation batches


def test_eval_covers_every_window_once():
    w = Windows(np.arange(60, dtype=np.uint16), 8, 8)  # 7 windows
    batches = list(eval_batches(w, 3))
    assert len(batches) == num_eval_batches(w, 3) == 3
    assert all(b["inputs"].shape == (3, 8) and b["mask"].shape == (3, 8) for b in batches)
    mask = np.concatenate([b["mask"][:, 0] for b in batches])
    assert mask.tolist() == [1] * 7 + [0] * 2
    assert sum(b["mask"].sum() for b in batches) == 7 * 8
    real = np.concatenate([b["inputs"] for b in batches])[mask == 1]
    np.testing.assert_array_equal(real, w.take(np.arange(7))["inputs"])
    assert len(list(eval_batches(w, 3, max_batches=2))) == 2
    # Sharded over 3 processes: the union is the single-process batch, mask included.
    for n, glob in enumerate(batches):
        parts = [list(eval_batches(w, 3, process_index=p, process_count=3))[n] for p in range(3)]
        for k in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), glob[k])


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


@pytest.mark.parametrize("kind", ["missing", "unknown-name", "empty-file", "blank-only", "no-txt", "not-utf8"])
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
        spec, match = str(tmp_path / "d"), "has no .txt files"
    else:
        (tmp_path / "b.txt").write_bytes(b"ok \xff\xfe bad")
        spec, match = str(tmp_path / "b.txt"), "not UTF-8"
    with pytest.raises(UserError, match=match) as e:
        prepare_tokens(spec, tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("*.bin")) if (tmp_path / "cache").exists() else True


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


@pytest.mark.parametrize("module, cls", [("classification", "ClassifyDataConfig"),
                                         ("instruct", "InstructDataConfig"),
                                         ("preference", "PreferenceDataConfig")])
@pytest.mark.parametrize("val, test, message", [(-0.1, 0.1, r"data.val_fraction must be in \[0, 1\), got -0.1"),
                                                (0.1, 1.0, r"data.test_fraction must be in \[0, 1\), got 1.0"),
                                                (0.5, 0.5, r"val_fraction \+ data.test_fraction must be < 1")])
def test_split_fractions_are_checked_by_every_record_task(module, cls, val, test, message):
    import importlib

    mod = importlib.import_module(f"jaxgpt.data.{module}")
    cfg = getattr(mod, cls)(path="x", val_fraction=val, test_fraction=test)
    with pytest.raises(UserError, match=message):
        mod.validate_data(cfg, 128)
    mod.validate_data(getattr(mod, cls)(path="x", val_fraction=0.1, test_fraction=0.2), 128)  # a valid split passes


# ---------------------------------------------------------------------------------------
# The package's layers (issue 17): no import cycle, no import in a function to dodge one

# Bottom first: a module may import only modules listed before it.
DATA_LAYERS = ["bundled", "text", "readers", "tfds_builders", "tfds_source", "records", "tokens", "windows",
               "classification", "instruct", "preference", "__init__"]
DATA_DIR = Path(data_pkg.__file__).parent
LAZY_ALLOWED = {"tensorflow_datasets"}  # slow to import; only tfds: sources may pay for it


def _module_name(stem: str) -> str:
    return "jaxgpt.data" if stem == "__init__" else f"jaxgpt.data.{stem}"


def _module_file(stem: str) -> Path:
    """A module's file; `bundled` (the packaged data sets) is a package of its own."""
    return DATA_DIR / stem / "__init__.py" if (DATA_DIR / stem).is_dir() else DATA_DIR / f"{stem}.py"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function or class) of every import statement in `path`;
    `from P import N` counts as module `P.N` where that is a module of this repository."""
    root = DATA_DIR.parent.parent

    def is_module(name: str) -> bool:
        path = root / name.replace(".", "/")
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    package = "jaxgpt.data"
    out = []

    def visit(node, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    out.append((full if is_module(full) else base, nested))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return out


def test_data_package_layers():
    import graphlib

    stems = sorted([p.stem for p in DATA_DIR.glob("*.py")] + [p.parent.name for p in DATA_DIR.glob("*/__init__.py")])
    assert sorted(DATA_LAYERS) == stems, "place every module of jaxgpt/data in DATA_LAYERS"
    graph, classes = {}, {}
    for stem in DATA_LAYERS:
        name = _module_name(stem)
        imports = _imports(_module_file(stem))
        lazy = {m for m, nested in imports if nested}
        assert lazy <= LAZY_ALLOWED, f"{name} imports {sorted(lazy - LAZY_ALLOWED)} inside a function"
        above = [m for m, _ in imports if m.split(".")[:2] in (["jaxgpt", "rl"], ["jaxgpt", "tasks"])]
        assert not above, f"{name} imports {above}: jaxgpt.data sits below jaxgpt.rl and jaxgpt.tasks"
        graph[name] = {m for m, _ in imports if m == "jaxgpt.data" or m.startswith("jaxgpt.data.")} - {name}
        for node in ast.parse(_module_file(stem).read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                assert node.name not in classes, f"class {node.name} in both {classes[node.name]} and {name}"
                classes[node.name] = name
    list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    order = [_module_name(s) for s in DATA_LAYERS]
    for name, deps in graph.items():
        higher = sorted(d for d in deps if order.index(d) > order.index(name))
        assert not higher, f"{name} imports {higher}, which DATA_LAYERS puts above it"

    # Imported bottom-up in a fresh interpreter, every module loads, and nothing pulls in
    # tensorflow_datasets, TensorFlow or the packages above (pretraining on a text file and
    # `finetune.py --help` do not pay for them).
    code = ("import importlib, sys\n"
            f"for name in {order!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')\n"
            "             or m.startswith(('jaxgpt.rl', 'jaxgpt.tasks'))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=DATA_DIR.parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
