"""`python -m jaxgpt tokenize`: GPT-2's ids for the book's sentence, a decode round trip, a
tokenizer.json folder or a run's tokenizer, the corpus token file `train.py` then reuses
with its windows, and bad input as one line with exit code 2."""
from __future__ import annotations

import json

import pytest

from jaxgpt.cli.tokenize import main
from jaxgpt.data import load_splits, prepare_token_file
from jaxgpt.config import DataConfig
from jaxgpt.text.tokenizer import load_tokenizer
from tests.test_text import make_hf_tokenizer

BOOK = "Hello, do you like tea?"
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30]  # Raschka, ch. 2, tiktoken's "gpt2"


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_to_ids_pieces_and_back(capsys):
    code, out, _ = _run([BOOK, " tea"], capsys)
    assert code == 0 and out.splitlines() == [" ".join(map(str, BOOK_IDS)), "8887"]
    code, out, _ = _run(["--pieces", "Hello, tea"], capsys)
    assert code == 0 and out.splitlines() == ["15496\t'Hello'", "11\t','", "8887\t' tea'"]
    code, out, _ = _run(["--decode", *BOOK_IDS], capsys)
    assert code == 0 and out == BOOK + "\n"


def test_a_tokenizer_folder_and_a_runs_tokenizer(tmp_path, capsys):
    folder = make_hf_tokenizer(tmp_path / "tok", n_words=40)
    want = load_tokenizer(str(folder)).encode("w3 w1 w39")
    assert _run(["--tokenizer", folder, "w3 w1 w39"], capsys)[1].split() == [str(i) for i in want]
    run = tmp_path / "run"  # a run's config names its copy of the tokenizer, relative to the run
    (run / "tokenizer").mkdir(parents=True)
    for f in folder.iterdir():
        (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
    (run / "config.yaml").write_text("model:\n  tokenizer: tokenizer\n  vocab_size: 64\nfinetune:\n  init: x\n")
    assert _run(["--tokenizer", run, "w3 w1 w39"], capsys)[1].split() == [str(i) for i in want]
    gpt2 = tmp_path / "hf-gpt2"  # a Hugging Face GPT-2 folder: tiktoken's BPE, as --init reads it
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    assert _run(["--tokenizer", gpt2, BOOK], capsys)[1].split() == [str(i) for i in BOOK_IDS]


def test_a_corpus_is_tokenized_once_for_training(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"Record number {i} of a small corpus."}) + "\n" for i in range(40)))
    argv = ["--data", corpus, "--text-field", "body", "--cache-dir", tmp_path / "cache", "--context-length", 8,
            "--stride", 4, "--show", 1]
    code, out, _ = _run(argv, capsys)
    path, n = prepare_token_file(str(corpus), tmp_path / "cache", "body")
    mtime = path.stat().st_mtime_ns
    splits = load_splits(DataConfig(path=str(corpus), cache_dir=str(tmp_path / "cache"), text_field="body",
                                    stride=4, val_ratio=0.1), 8)
    assert path.stat().st_mtime_ns == mtime  # train.py's loader reuses the file the command wrote
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"{corpus}: {n:,} tokens (gpt2, uint16) -> {path} (")
    assert lines[1] == (f"windows of 8 tokens: train {len(splits.train):,} (stride 4), "
                        f"val {len(splits.val):,} (stride 8)")
    inputs, targets = splits.train[0]
    assert lines[3:5] == [f"  inputs  {' '.join(map(str, inputs))}", f"  targets {' '.join(map(str, targets))}"]
    assert list(targets[:-1]) == list(inputs[1:])


@pytest.mark.parametrize("argv, message", [
    ([], "give TEXT to encode, --decode IDS or --data SOURCE"),
    (["--decode", "50257"], "id 50257 is outside the vocabulary [0, 50257)"),
    (["--tokenizer", "{tmp}/nope", "hi"], "is neither gpt2, a folder with tokenizer.json, nor a jaxgpt run"),
    (["--tokenizer", "{tmp}", "hi"], "the folder has no tokenizer.json"),
    (["--data", "the-verdict", "--show", "2"], "--show prints windows: give --context-length T"),
    (["--context-length", "8", "hi"], "give --data SOURCE"),
    (["--data", "{tmp}/missing.txt"], "neither a bundled corpus"),
    (["--data", "{tmp}/c.jsonl", "--text-field", "body"],
     "line 1 has no field 'body' (fields: text); give --text-field"),
    (["--data", "the-verdict", "--context-length", "100000", "--cache-dir", "{tmp}/cache"],
     "fewer than one window of context_length+1=100,001"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    (tmp_path / "c.jsonl").write_text('{"text": "a document"}\n')
    if not argv:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
        return
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
