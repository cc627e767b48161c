"""Windows, splits, training and evaluation batches, and the data package's import layers
(CPU, offline, a few seconds). Token files and sources: `test_token_files.py`."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxgpt.data as data_pkg
from jaxgpt.data import (
    BatchSampler,
    Windows,
    eval_batches,
    make_splits,
    num_eval_batches,
    split_tokens,
)
from jaxgpt.errors import UserError


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
DATA_LAYERS = ["bundled", "text", "parquet", "hub_datasets", "conversations", "readers", "tfds_builders", "tfds_source",
               "records", "tokens", "windows", "classification", "instruct", "preference", "__init__"]
DATA_DIR = Path(data_pkg.__file__).parent
# Slow to import or optional: only tfds: sources and .parquet files pay for them.
LAZY_ALLOWED = {"tensorflow_datasets", "pyarrow", "pyarrow.parquet"}


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
    # tensorflow_datasets, TensorFlow, pyarrow or the packages above (pretraining on a text file and
    # `finetune.py --help` do not pay for them).
    code = ("import importlib, sys\n"
            f"for name in {order!r}:\n"
            "    importlib.import_module(name)\n"
            "heavy = ('tensorflow', 'tensorflow_datasets', 'pyarrow')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
            "             or m.startswith(('jaxgpt.rl', 'jaxgpt.tasks'))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=DATA_DIR.parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
