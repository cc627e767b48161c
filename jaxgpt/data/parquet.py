"""Apache Parquet files, the format of Hugging Face datasets on the Hub, read with pyarrow.

    for where, row in parquet_rows(path, required={"text": "text"}):   # streamed, a batch at a time
        row["text"]
    for document in parquet_documents(path, "text"):   # a corpus: each row's text, safe-cut pieces
        ...
    class_names(path, "label")   # ["ham", "spam"]: a `datasets` ClassLabel's names, else []

A parquet file is one table; each row is one record, its columns the record's fields. The
readers above use it as they use JSON Lines: a corpus file's `data.text_field` column holds
one document a row (`jaxgpt.data.tokens`), a record file's columns are the task's fields
(`jaxgpt.data.readers`). Rows are read a batch at a time, only the columns asked for, so a
corpus shard larger than memory streams. A column that is missing is a one-line error that
lists the file's columns and names the config key to set.

pyarrow is optional (`pip install -e ".[parquet]"`); without it reading a `.parquet` file is a
one-line error that says so. Nothing else in jaxgpt needs it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from jaxgpt.data.text import CHUNK_CHARS, split_text
from jaxgpt.errors import UserError

PARQUET_SUFFIX = ".parquet"
BATCH_ROWS = 1024  # rows decoded into Python objects at a time


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(PARQUET_SUFFIX)


def _read_errors() -> tuple[type[Exception], ...]:
    """What pyarrow raises on a file that is not parquet or is cut short (ArrowInvalid is a
    ValueError, a bad footer an OSError)."""
    import pyarrow as pa
    return OSError, pa.lib.ArrowException


def open_parquet(path: Path):
    """`pyarrow.parquet.ParquetFile` of `path`; a one-line UserError if pyarrow is missing or
    the file is not parquet."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow, which is not installed: pip install -e \".[parquet]\" "
                        "(or pip install pyarrow)") from None
    try:
        return pq.ParquetFile(path)
    except _read_errors() as e:
        raise UserError(f"cannot read {path} as a parquet file: {e}") from None


def _check_columns(path: Path, have: list[str], required: Mapping[str, str]) -> None:
    for role, name in required.items():
        if name not in have:
            raise UserError(f"{path} has no {role} column {name!r} (columns: {', '.join(have) or 'none'}); "
                            f"set data.{role}_field")


def parquet_rows(path: Path, required: Mapping[str, str], optional: Iterable[str] = (),
                 alternatives: Iterable[str] = ()) -> Iterator[tuple[str, dict]]:
    """`("row N", {column: value})` for every row (N from 1), streamed a batch at a time.

    `required` maps roles to column names (`{"text": "sms"}`): each must exist, else a UserError
    naming `data.<role>_field`, unless one of the `alternatives` columns (read in their place)
    does. Only those and the `optional` columns that exist are read;
    values are Python objects (str, int, None, lists and dicts for nested columns)."""
    pf = open_parquet(path)
    have = list(pf.schema_arrow.names)
    if not any(c in have for c in alternatives):
        _check_columns(path, have, required)
    wanted = list(dict.fromkeys([*(c for c in required.values() if c in have), *(c for c in optional if c in have)]))
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except _read_errors() as e:  # a corrupt column chunk
        raise UserError(f"cannot read {path} (after row {n}): {e}") from None


def class_names(path: Path, column: str) -> list[str]:
    """The label names of `column` when the file was written by Hugging Face `datasets` with a
    `ClassLabel` feature (its schema metadata), so integer labels read as the names the dataset
    gives them ("ham", "spam"), as tfds's ClassLabel does; else []."""
    meta = open_parquet(path).schema_arrow.metadata or {}
    try:
        feature = json.loads(meta[b"huggingface"])["info"]["features"][column]
    except (KeyError, TypeError, ValueError):
        return []
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        return [str(name) for name in feature.get("names") or []]
    return []


def parquet_documents(path: Path, text_field: str, max_chars: int = CHUNK_CHARS) -> Iterator[Iterator[str]]:
    """Each row's `text_field` of a parquet corpus as one document of safe-cut pieces (null
    rows skipped), streamed as `parquet_rows` reads. A non-text value is a one-line error."""
    for where, row in parquet_rows(path, {"text": text_field}):
        text = row[text_field]
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} {where}: column {text_field!r} is not UTF-8 (byte {e.start})") from None
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(f"{path} {where}: column {text_field!r} is {type(text).__name__}, not text; "
                            "set data.text_field")
        yield split_text(text, max_chars)
