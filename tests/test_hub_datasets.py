"""`data.path: hf:ORG/NAME[:SUBSET][:SPLIT]` (`jaxgpt.data.hub_datasets`): a hub data set's split is
the files the `datasets` library assigns it (names, README `configs:`), downloaded once from a
loopback hub, verified, reused offline, and read as `datasets.load_dataset` reads them; folders of
record shards; the errors."""
from __future__ import annotations

import json
import os

import pytest

pa = pytest.importorskip("pyarrow")
datasets = pytest.importorskip("datasets")

import pyarrow.parquet as pq  # noqa: E402

from jaxgpt.data.hub_datasets import parse_spec, pick_files, pinned, readme_subsets, splits_by_name  # noqa: E402
from jaxgpt.data.records import read_examples, read_records  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from tests.test_hf_folders import RepoServer  # noqa: E402

LAYOUTS = {
    "names": ["train.csv", "test.csv", "validation.csv"],
    "keywords": ["my_train_file.csv", "test-file.csv", "validation1.csv", "dev_extra.jsonl"],
    "folders": ["data/train/a.jsonl", "data/train/b.jsonl", "data/test/c.jsonl", "random/training-2/d.jsonl"],
    "sharded": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                "data/test-00000-of-00001.parquet", "data/train_prefs-00000-of-00001.parquet"],
    "one file": ["data.csv"],
    "no keyword": ["a/x.jsonl", "b/y.jsonl", "contest.jsonl"],
    "folder beats file": ["train/eval-1.jsonl", "test/other.jsonl"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_splits_are_the_datasets_librarys(tmp_path, layout):
    """The split -> files of a repository's names equal `datasets`' own resolution of the same tree."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    for name in LAYOUTS[layout]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    patterns = get_data_patterns(str(tmp_path))
    theirs = {split: sorted(os.path.relpath(f, tmp_path) for f in files)
              for split, files in DataFilesDict.from_patterns(patterns, base_path=str(tmp_path)).items()}
    assert {k: sorted(v) for k, v in splits_by_name(sorted(LAYOUTS[layout])).items()} == theirs


CARD = """---
license: cc-by-4.0
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: chat
  data_files: chat/*.parquet
---
# A data set card
"""


def _repo(root):
    """A data set repository: its card's default subset has parquet train and test shards; subset
    `chat` holds conversations; files outside any split are never fetched."""
    (root / "data").mkdir(parents=True)
    (root / "chat").mkdir()
    (root / "README.md").write_text(CARD)
    (root / ".gitattributes").write_text("*.parquet filter=lfs\n")
    rows = [{"instruction": f"Say w{i}.", "input": "" if i % 2 else f"w{i}", "output": f"w{i} w{i}"} for i in range(9)]
    pq.write_table(pa.Table.from_pylist(rows[:5]), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), root / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3]), root / "data" / "test-00000-of-00001.parquet")
    (root / "data" / "unused-extra.jsonl").write_text("not json\n")
    chats = [[{"role": "user", "content": f"w{i}"}, {"role": "assistant", "content": f"w{i + 1}"}] for i in range(4)]
    pq.write_table(pa.table({"messages": chats}), root / "chat" / "part-0.parquet")
    return rows, chats


ROLES = {"instruction": "instruction", "output": "output"}


def test_a_hub_split_downloads_once_and_reads_as_datasets_loads_it(tmp_path, monkeypatch):
    rows, chats = _repo(tmp_path / "repo")
    server = RepoServer(tmp_path / "repo", "Org/Instr", token="s3cret", kind="datasets")
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match="Org/Instr is gated or private .* set HF_TOKEN"):
        read_records("hf:Org/Instr", ROLES)
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    hf_cache = str(tmp_path / "datasets-cache")
    for spec, subset, split in (("hf:Org/Instr", None, "train"), ("hf:Org/Instr:test", None, "test")):
        want = datasets.load_dataset(str(tmp_path / "repo"), subset, split=split, cache_dir=hf_cache).to_list()
        got = read_records(spec, ROLES, {"input": "input"})
        assert got == [{k: r[k] for k in ("instruction", "output", "input")} for r in want], spec
    folder = tmp_path / "cache" / "hf" / "datasets" / "Org--Instr" / "default" / "train"
    # at a revision (a tag, branch or commit): asked of the hub, kept apart
    assert read_records("hf:Org/Instr@v1.0:test", ROLES) == read_records("hf:Org/Instr:test", ROLES)
    assert any("/revision/v1.0?" in r for r in server.requests)
    assert (folder.parent.parent / "@v1.0" / "default" / "test.verified.json").is_file()
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    # the subset `chat` by name (its one split), as conversations
    got = read_records("hf:Org/Instr:chat", ROLES, instead={"messages": "messages"})
    theirs = datasets.load_dataset(str(tmp_path / "repo"), "chat", split="train", cache_dir=hf_cache)
    assert [r["messages"] for r in got] == chats == theirs["messages"]
    # verified once: offline afterwards, with no request at all
    asked = len(server.requests)
    server.server.shutdown()
    server.server.server_close()  # connections refused: offline
    assert read_records("hf:Org/Instr", ROLES) == read_records(str(folder), ROLES)
    # pinned to the commit it was read from (what a run's config.yaml keeps): found in the cache, offline
    exact = pinned("hf:Org/Instr")
    assert exact == f"hf:Org/Instr@{RepoServer.SHA}:default:train" and pinned("the-verdict") == "the-verdict"
    assert read_records(exact, ROLES) == read_records(str(folder), ROLES)
    assert len(read_records("hf:Org/Instr:chat", ROLES, instead={"messages": "messages"})) == 4
    assert len(server.requests) == asked
    with pytest.raises(UserError, match=r"cannot download Org/Instr \(offline\?\): download the data files"):
        read_records("hf:Org/Instr:validation", ROLES)


@pytest.mark.slow
def test_finetune_instruct_on_a_hub_split(tmp_path, monkeypatch):
    from tests.cli_helpers import run_finetune
    from tests.test_instruct import TINY, _argv

    _repo(tmp_path / "repo")
    server = RepoServer(tmp_path / "repo", "Org/Instr", kind="datasets")
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
    sets = [s for s in TINY if not s.startswith(("train.epochs", "train.batch_size", "data."))] + [
        "train.epochs=1", "train.batch_size=4", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    assert run_finetune(_argv("--data", "hf:Org/Instr", "--out", tmp_path / "sft", sets=sets)) == 0
    assert len(json.loads((tmp_path / "sft" / "responses.json").read_text())) == 1
    # the run keeps the commit it read: --resume reads the same records wherever it runs
    import yaml

    saved = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())["data"]["path"]
    assert saved == f"hf:Org/Instr@{RepoServer.SHA}:default:train"


def test_no_pyarrow_or_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from jaxgpt.io import download

    _repo(tmp_path / "repo")
    server = RepoServer(tmp_path / "repo", "Org/Instr", kind="datasets")
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
    import importlib.util

    find_spec = importlib.util.find_spec
    with monkeypatch.context() as m:  # parquet files without pyarrow: said before anything is downloaded
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else find_spec(name, *a))
        with pytest.raises(UserError, match=r"Org/Instr's train files are parquet, which needs pyarrow"):
            read_records("hf:Org/Instr", ROLES)
    assert not (tmp_path / "cache" / "hf" / "datasets" / "Org--Instr" / "default").exists()

    class Full:  # a download's file, whose writes fail as on a full disk
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "open", Full, raising=False)
    with pytest.raises(UserError, match=r"^the disk is full: could not write the files of Org/Instr .*; free space, "
                                         r"or set \$JAXGPT_CACHE to another disk$"):
        read_records("hf:Org/Instr", ROLES)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_which_files_a_spec_names():
    names = ["README.md", "chat/part-0.parquet", "data/test-00000-of-00001.parquet",
             "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/unused-extra.jsonl",
             "weights.bin"]
    assert list(readme_subsets(CARD)) == ["default", "chat"]
    assert pick_files(parse_spec("hf:O/N"), names, CARD)[:2] == ("default", "train")
    assert pick_files(parse_spec("hf:O/N:default:test"), names, CARD)[2] == ["data/test-00000-of-00001.parquet"]
    assert pick_files(parse_spec("hf:O/N:chat:train"), names, CARD)[2] == ["chat/part-0.parquet"]
    assert pick_files(parse_spec("hf:O/N/data/*.jsonl"), names, CARD)[2] == ["data/unused-extra.jsonl"]
    # without a card: names decide; the only split is the default
    assert pick_files(parse_spec("hf:O/N"), ["x/eval.jsonl"], "")[1:] == ("test", ["x/eval.jsonl"])
    for spec, message in (("hf:O/N:valid", r"no split 'valid' \(its splits: train, test\); e.g. hf:O/N:train"),
                          ("hf:O/N:nope:train", r"no subset 'nope' \(its subsets: default, chat\)"),
                          ("hf:O", "give hf:ORG/NAME"), ("hf:O/N:a:b:c", "give hf:ORG/NAME"),
                          ("hf:O/N/x.parquet:train", "give hf:ORG/NAME"), ("hf:O/N@a b", "NAME@REV")):
        with pytest.raises(UserError, match=message):
            pick_files(parse_spec(spec), names, CARD)
    with pytest.raises(UserError, match="no data files jaxgpt reads"):
        pick_files(parse_spec("hf:O/N"), ["README.md", "weights.bin"], "")


def test_folders_of_record_shards(tmp_path):
    """A folder is its data files' records in path order (shards of one split); labelled
    examples likewise; a folder with none is one line."""
    (tmp_path / "d" / "b").mkdir(parents=True)
    (tmp_path / "d" / "a.jsonl").write_text('{"instruction": "i1", "output": "o1"}\n')
    pq.write_table(pa.Table.from_pylist([{"instruction": "i2", "output": "o2"}]), tmp_path / "d" / "b" / "x.parquet")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    assert [r["instruction"] for r in read_records(str(tmp_path / "d"), ROLES)] == ["i1", "i2"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "1.csv").write_text("text,label\nhi,ham\n")
    (tmp_path / "c" / "2.jsonl").write_text('{"text": "win", "label": "spam"}\n')
    assert read_examples(str(tmp_path / "c")) == (["hi", "win"], ["ham", "spam"])
    for read in (lambda spec: read_records(spec, ROLES), read_examples):  # a hub id without hf:
        with pytest.raises(UserError, match=r"not found: .*; did you mean hf:tatsu-lab/alpaca\?$"):
            read("tatsu-lab/alpaca")
    with pytest.raises(UserError, match=r"not found: .*tfds:NAME$"):  # a missing file's path: no hint
        read_records("data/train.jsonl", ROLES)
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match=r"folder .*e has no \.json, \.jsonl, \.parquet files"):
        read_records(str(tmp_path / "e"), ROLES)


def test_a_corpus_from_the_hub(tmp_path, monkeypatch):
    """Pretraining reads an hf: spec as the folder it downloads (here a glob of its files)."""
    from jaxgpt.data.tokens import resolve_source

    _repo(tmp_path / "repo")
    server = RepoServer(tmp_path / "repo", "Org/Instr", kind="datasets")
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
    source = resolve_source("hf:Org/Instr/data/train-*", text_field="output")
    documents = ["".join(d) for d in source.documents()]
    assert documents == [f"w{i} w{i}" for i in range(9)]
