"""Parquet files (Hugging Face datasets' format) as corpora, record files and labelled examples."""
from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxgpt.data import prepare_tokens
from jaxgpt.data import parquet as parquet_mod
from jaxgpt.data.classification import ClassifyDataConfig, load_classification
from jaxgpt.data.readers import read_file
from jaxgpt.data.records import read_records
from jaxgpt.errors import UserError
from jaxgpt.rl.tasks import Gsm8kTask
from jaxgpt.text import gpt2_bpe as tokenizer

EOT = 50256


def _write(path, columns: dict, row_group_size: int | None = None):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_corpus_rows_are_documents_streamed_a_batch_at_a_time(tmp_path, monkeypatch):
    """Each row's text_field is a document (nulls and empty texts skipped), joined with
    <|endoftext|> as JSON Lines records are; row groups and batches do not change the tokens;
    a folder mixes .parquet with .txt; another text field is another token file."""
    e = tokenizer.encode
    texts = ["First row.", None, "", "caf\u00e9\n<|endoftext|>x"] + [f"Row {i} says hello." for i in range(40)]
    monkeypatch.setattr(parquet_mod, "BATCH_ROWS", 7)
    corpus = _write(tmp_path / "c.parquet", {"text": texts, "id": list(range(len(texts)))}, row_group_size=10)
    assert pq.ParquetFile(corpus).metadata.num_row_groups == 5
    want = []
    for t in texts:
        if t:
            want += ([EOT] if want else []) + e(t)
    assert prepare_tokens(str(corpus), tmp_path / "cache").tolist() == want
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("A text file.")
    _write(root / "sub" / "train-00000-of-00001.parquet", {"text": ["Shard row."], "n": [1]})
    assert prepare_tokens(str(root), tmp_path / "cache").tolist() == e("A text file.") + [EOT] + e("Shard row.")
    two = _write(tmp_path / "two.parquet", {"text": ["t1", "t2"], "body": ["b1", "b2"]})
    assert prepare_tokens(str(two), tmp_path / "cache", "body").tolist() == e("b1") + [EOT] + e("b2")
    assert prepare_tokens(str(two), tmp_path / "cache").tolist() == e("t1") + [EOT] + e("t2")
    assert len(list((tmp_path / "cache").glob("two-*.bin"))) == 2  # one token file per text field


@pytest.mark.parametrize("kind", ["no-column", "not-text", "not-parquet", "no-pyarrow"])
def test_corpus_errors_are_one_line(tmp_path, monkeypatch, kind):
    path = tmp_path / "c.parquet"
    if kind == "not-parquet":
        path.write_text("a text file named .parquet\n")
        match = r"cannot read .*c.parquet as a parquet file"
    else:
        _write(path, {"body": ["x"], "n": [1]} if kind != "not-text" else {"text": [[1, 2]]})
        match = {"no-column": r"has no text column 'text' \(columns: body, n\); set data.text_field",
                 "not-text": "row 1: column 'text' is list, not text; set data.text_field",
                 "no-pyarrow": r"needs pyarrow, which is not installed: pip install -e \".\[parquet\]\""}[kind]
    if kind == "no-pyarrow":
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as when not installed
    with pytest.raises(UserError, match=match) as err:
        prepare_tokens(str(path), tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.rglob("*.bin"))


def test_records_for_instructions_preferences_and_gsm8k(tmp_path):
    """Alpaca's and GSM8K's Hub parquet layouts: columns are fields, a null optional field is ""."""
    alpaca = _write(tmp_path / "alpaca.parquet", {
        "instruction": ["Add the numbers.", "Name a colour."], "input": ["2 and 3", None],
        "output": ["5", "Blue."], "text": ["(the prompt)", "(the prompt)"]})
    rows = read_records(str(alpaca), {"instruction": "instruction", "output": "output"}, {"input": "input"})
    assert rows == [{"instruction": "Add the numbers.", "output": "5", "input": "2 and 3"},
                    {"instruction": "Name a colour.", "output": "Blue.", "input": ""}]
    with pytest.raises(UserError, match=r"has no output column 'answer' \(columns: instruction, input, output, "
                                        r"text\); set data.output_field"):
        read_records(str(alpaca), {"instruction": "instruction", "output": "answer"})
    chat = _write(tmp_path / "chat.parquet", {"prompt": ["Hi"], "chosen": [[{"role": "user", "content": "Hi"},
                                                                          {"role": "assistant", "content": "Hello!"}]]})
    with pytest.raises(UserError, match=r"row 1: field for chosen is a conversation \(a list of 2 messages\)"):
        read_records(str(chat), {"instruction": "prompt", "chosen": "chosen"})
    gsm = _write(tmp_path / "test-00000-of-00001.parquet", {
        "question": ["Tom has 3 apples and buys 4. How many?"], "answer": ["3 + 4 = <<3+4=7>>7\n#### 7"]})
    (problem,) = Gsm8kTask(path=str(gsm)).problems()
    assert (problem.answer, problem.solution) == ("7", "3 + 4 = 7\n#### 7")


def test_labelled_examples_read_datasets_class_names(tmp_path):
    """A file written by Hugging Face `datasets` with a ClassLabel column reads its names, as
    tfds's ClassLabel does; plain integer labels stay numbers."""
    import datasets

    features = datasets.Features({"sms": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["ham", "spam"])})
    texts = [f"message {i}" for i in range(20)]
    hub = tmp_path / "sms_spam.parquet"
    datasets.Dataset.from_dict({"sms": texts, "label": [i % 3 == 0 for i in range(20)]},
                               features=features).to_parquet(str(hub))
    got_texts, labels = read_file(hub, "sms", "label")
    assert got_texts == texts and labels == ["spam" if i % 3 == 0 else "ham" for i in range(20)]
    data = load_classification(ClassifyDataConfig(path=str(hub), text_field="sms"), context_length=32)
    assert data.labels == ["ham", "spam"]
    plain = _write(tmp_path / "plain.parquet", {"text": ["a", "b"], "label": [1, 0]})
    assert read_file(plain) == (["a", "b"], ["1", "0"])
    with pytest.raises(UserError, match=r"has no label column 'label' \(columns: sms\); set data.label_field"):
        read_file(_write(tmp_path / "nolabel.parquet", {"sms": ["x"]}), "sms")
