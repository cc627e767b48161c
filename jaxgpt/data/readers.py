"""Record files on local disk: JSON / JSONL / parquet records by role, and labelled examples.

The record-reader layer of `jaxgpt.data`, above `jaxgpt.data.text` and below everything that
resolves a `data.path` (`jaxgpt.data.records`) or builds a TFDS dataset from a bundled file
(`jaxgpt.data.tfds_builders`): local files only, no tfds, so both can use it and the bundled
file and its TFDS build read the same records.

    rows = read_json_records(path, required={"instruction": "instruction"}, optional={"input": "input"})
    rows[0]   # {"instruction": "...", "input": ""}: keys are roles, values strings
    texts, labels = read_file("spam.tsv", text_field="text", label_field="label")

A role's field name is configurable (`data.<role>_field`), so errors name the config key to set;
missing optional fields read as "". A record where a field of `instead` holds a list (a
conversation: `data.messages_field`, or conversational preference pairs) is read by those fields
in place of the required roles, and its lists of messages are kept for
`jaxgpt.data.conversations`. Formats come from the suffix before any `.gz`: `.json` is one array
of objects or one object a line, `.jsonl` one object a line, `.csv` a header row then rows (the
`csv` module), anything else TSV with a header naming the text and label columns, or headerless
`label<TAB>text` lines (the SMS file's layout; the text is everything after the first TAB). A
`.parquet` file (Hugging Face datasets' format) is a table whose columns are the fields; a
`datasets` ClassLabel column reads as its names. Every problem is a one-line UserError naming
the file and line (or row).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator, Mapping

from jaxgpt.data.parquet import class_names, is_parquet, parquet_rows
from jaxgpt.data.text import read_text, text_lines
from jaxgpt.errors import UserError


# ---------------------------------------------------------------------------------------
# JSON records by role


def file_format(path: Path) -> str:
    """`jsonl`, `json`, `csv` or `tsv` (anything else), from the suffix before any `.gz`."""
    kind = data_format(path)
    return kind if kind in ("jsonl", "json", "csv") else "tsv"


def data_format(path: Path) -> str | None:
    """`json`, `jsonl`, `csv`, `tsv` or `parquet` from the suffix before any `.gz`; None for other files."""
    name = path.name.lower().removesuffix(".gz")
    return next((f for f in ("jsonl", "json", "csv", "tsv", "parquet") if name.endswith("." + f)), None)


def json_values(path: Path, text: str) -> Iterator[tuple[str, object]]:
    """`(where, value)` of every record: a JSON array (a `.json` file starting with `[`), or
    one JSON value a line (blank lines skipped). `where` is "record N" or "line N"."""
    if file_format(path) == "json" and text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(values, list):
            raise UserError(f"{path}: expected a JSON array of objects")
        for i, value in enumerate(values, 1):
            yield f"record {i}", value
        return
    for i, line in enumerate(text_lines(text), 1):
        if not line.strip():
            continue
        try:
            yield f"line {i}", json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {i} is not valid JSON ({e.msg}, column {e.colno})") from None


def _string(value, where: str, role: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return value
    if _is_conversation(value):
        raise UserError(f"{where}: field for {role} is a conversation (a list of {len(value)} messages); jaxgpt reads "
                        f"one string a field: point data.{role}_field at a text column (finetune.py instruct reads "
                        "conversations from data.messages_field)")
    raise UserError(f"{where}: field for {role} must be a string, got {json.dumps(value, default=str)[:40]}")


def _is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) and ("content" in m or "value" in m)
                                                           for m in value)


def pick_fields(record: object, where: str, required: Mapping[str, str], optional: Mapping[str, str],
                instead: Mapping[str, str] | None = None) -> dict:
    """`{role: value}` from one record (see the module docstring): strings, except in a record
    where a field of `instead` holds a list (a conversation): that record is read by `instead`,
    the other roles become optional, and any role may hold a list of messages (kept as it is,
    for `jaxgpt.data.conversations.as_messages`)."""
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    chat = bool(instead) and any(isinstance(record.get(f), (list, tuple)) for f in instead.values())
    if chat:
        optional = {**{r: f for r, f in required.items() if r not in instead}, **optional}
        required = instead
    out = {}
    for role, field in required.items():
        if field not in record:
            have = ", ".join(sorted(map(str, record))) or "none"
            alternative = "".join(f", or data.{r}_field for {r}" for r in (instead or {}) if r not in required)
            chats = [k for k, v in record.items() if _is_conversation(v)]
            if instead and chats and not chat:
                alternative = (f"; its field {chats[0]!r} is a conversation: "
                               f"set data.{next(iter(instead))}_field={chats[0]}")
            raise UserError(f"{where} has no {role} field {field!r} (it has: {have}); set data.{role}_field"
                            + alternative)
        out[role] = record[field]
    for role, field in optional.items():
        out[role] = "" if record.get(field) is None else record[field]
    return {role: list(v) if chat and isinstance(v, (list, tuple)) else _string(v, where, role)
            for role, v in out.items()}


RECORD_FORMATS = ("json", "jsonl", "parquet")  # JSON records by role
EXAMPLE_FORMATS = ("json", "jsonl", "csv", "tsv", "parquet")  # labelled examples


def files_below(folder: Path, formats: tuple[str, ...]) -> list[Path]:
    """The files of `formats` below `folder` (recursively; sorted by path: shards in order). A
    folder of record shards (a Hugging Face data set's `data/train-0000N-of-0000M.parquet`) is
    read as one file of all their records. UserError if there is none."""
    files = sorted((p for p in folder.rglob("*") if p.is_file() and data_format(p) in formats
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise UserError(f"folder {folder} has no {', '.join('.' + f for f in formats)} files (optionally .gz) to read")
    return files


def read_record_file(path: Path, required: Mapping[str, str], optional: Mapping[str, str],
                     instead: Mapping[str, str] | None = None) -> list[dict]:
    """`{role: value}` of every record of a .json/.jsonl(.gz) or .parquet file (see `pick_fields`)."""
    instead = dict(instead or {})
    if is_parquet(path):
        rows = parquet_rows(path, required, [*optional.values(), *instead.values()], alternatives=instead.values())
        return [pick_fields(row, f"{path} {where}", required, optional, instead) for where, row in rows]
    return read_json_records(path, required, optional, instead)


def read_json_records(path: Path, required: Mapping[str, str], optional: Mapping[str, str],
                      instead: Mapping[str, str] | None = None) -> list[dict]:
    """`{role: value}` of every record of a .json/.jsonl(.gz) file (see `pick_fields`)."""
    text = read_text(path)
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    if file_format(path) not in ("json", "jsonl"):
        raise UserError(f"data file {path}: expected .json or .jsonl (optionally .gz)")
    return [pick_fields(value, f"{path} {where}", required, optional, instead)
            for where, value in json_values(path, text)]


# ---------------------------------------------------------------------------------------
# Labelled examples (text, label)


def label_text(value, where: str) -> str:
    """A label as a non-empty string (`true`/`false` for booleans, `3` for 3.0), whatever the
    format gave (a CSV cell, a JSON number, a tfds ClassLabel name), so classes compare equal."""
    if value is None or isinstance(value, (dict, list)):
        raise UserError(f"{where}: label must be a string or a number, got {json.dumps(value)}")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    label = str(value).strip()
    if not label:
        raise UserError(f"{where}: empty label")
    return label


def _read_jsonl(path: Path, text: str, text_field: str, label_field: str):
    texts, labels = [], []
    for where, rec in json_values(path, text):
        row = pick_fields(rec, f"{path} {where}", {"text": text_field}, {})
        if label_field not in rec:
            have = ", ".join(sorted(map(str, rec))) or "none"
            raise UserError(f"{path} {where} has no label field {label_field!r} (it has: {have}); set data.label_field")
        texts.append(row["text"])
        labels.append(label_text(rec[label_field], f"{path} {where}"))
    return texts, labels


def _read_csv(path: Path, text: str, text_field: str, label_field: str):
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as e:
        raise UserError(f"{path} line 1 is not valid CSV ({e})") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    for field, kind in ((text_field, "text"), (label_field, "label")):
        if field not in header:
            raise UserError(f"{path} has no {kind} column {field!r} in its header "
                            f"(columns: {', '.join(header) or 'none'}); set data.{kind}_field")
    ti, li = header.index(text_field), header.index(label_field)
    texts, labels = [], []
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path} line {reader.line_num}"
            if len(row) <= max(ti, li):
                raise UserError(f"{where} has {len(row)} columns; the header has {len(header)}")
            texts.append(row[ti])
            labels.append(label_text(row[li], where))
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num} is not valid CSV ({e})") from None
    return texts, labels


def _read_tsv(path: Path, text: str, text_field: str, label_field: str):
    lines = text_lines(text)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return [], []
    header = [h.strip().lstrip("\ufeff") for h in lines[first].split("\t")]
    texts, labels = [], []
    if text_field in header and label_field in header:
        ti, li = header.index(text_field), header.index(label_field)
        for i, line in enumerate(lines[first + 1:], first + 2):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != len(header):
                raise UserError(f"{path} line {i} has {len(cols)} TAB-separated columns; the header has {len(header)}")
            texts.append(cols[ti])
            labels.append(label_text(cols[li], f"{path} line {i}"))
        return texts, labels
    if len(header) == 1 or label_field in header or text_field in header:
        raise UserError(f"{path}: neither a TSV header with columns {label_field!r} and {text_field!r} "
                        f"(set data.label_field / data.text_field) nor headerless label<TAB>text lines "
                        f"(line {first + 1} is {lines[first][:40]!r})")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise UserError(f"{path} line {i} has no TAB; headerless TSV lines are label<TAB>text")
        label, body = line.split("\t", 1)
        texts.append(body)
        labels.append(label_text(label, f"{path} line {i}"))
    return texts, labels


def _read_parquet(path: Path, text_field: str, label_field: str):
    names = class_names(path, label_field)  # a `datasets` ClassLabel: 0 -> "ham"
    texts, labels = [], []
    for where, row in parquet_rows(path, {"text": text_field, "label": label_field}):
        where = f"{path} {where}"
        value = row[label_field]
        if names and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(names):
                raise UserError(f"{where}: label {value} is not one of the file's {len(names)} classes")
            value = names[value]
        texts.append(pick_fields(row, where, {"text": text_field}, {})["text"])
        labels.append(label_text(value, where))
    return texts, labels


def read_file(path: str | Path, text_field: str = "text", label_field: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels) of a JSONL/JSON/CSV/TSV or parquet file (see the module docstring)."""
    path = Path(path)
    if is_parquet(path):
        texts, labels = _read_parquet(path, text_field, label_field)
        if not texts:
            raise UserError(f"data file {path} has no examples")
        return texts, labels
    text = read_text(path)
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    fmt = file_format(path)
    reader = {"jsonl": _read_jsonl, "json": _read_jsonl, "csv": _read_csv, "tsv": _read_tsv}[fmt]
    texts, labels = reader(path, text, text_field, label_field)
    if not texts:
        raise UserError(f"data file {path} has no examples")
    return texts, labels
