"""Records of JSON / JSONL data sets, read by role with configurable field names.

    rows = read_records("instruction-data", required={"instruction": "instruction", "output": "output"},
                        optional={"input": "input"})
    rows[0]   # {"instruction": "...", "output": "...", "input": ""}: keys are roles, values strings

Used by every task whose examples are JSON objects (instruction tuning, preference pairs,
GSM8K): `spec` is a bundled data set name (`jaxgpt.datasets`, kinds json / jsonl), a file
(`.json`: one array of objects, or one object a line; `.jsonl`: one object a line; either
may be gzipped), or `tfds:NAME[:SPLIT]` (bytes features decoded as UTF-8). A role's field
name is configurable (`data.<role>_field`), so errors name the config key to set. Missing
optional fields read as "". Every problem is a one-line UserError naming the file and line.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator, Mapping

from jaxgpt.errors import UserError


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """UserError unless `data.val_fraction` and `data.test_fraction` are each in [0, 1) and
    leave some records to train on."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"data.{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(f"data.val_fraction + data.test_fraction must be < 1 (the rest trains), "
                        f"got {val_fraction} + {test_fraction}")


def open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text, transparently gunzipped for `.gz`, newlines untranslated."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_text(path: Path) -> str:
    try:
        with open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read data file {path}: {e}") from None


def text_lines(text: str) -> list[str]:
    """Lines split on \\n only (str.splitlines would also split inside a text on U+2028 etc.)."""
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def file_format(path: Path) -> str:
    """`jsonl`, `json`, `csv` or `tsv` (anything else), from the suffix before any `.gz`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    return {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}.get(ext, "tsv")


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
    raise UserError(f"{where}: field for {role} must be a string, got {json.dumps(value, default=str)[:40]}")


def pick_fields(record: object, where: str, required: Mapping[str, str],
                optional: Mapping[str, str]) -> dict[str, str]:
    """`{role: string}` from one record (see the module docstring)."""
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    out = {}
    for role, field in required.items():
        if field not in record:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise UserError(f"{where} has no {role} field {field!r} (it has: {have}); set data.{role}_field")
        out[role] = _string(record[field], where, role)
    for role, field in optional.items():
        value = record.get(field)
        out[role] = "" if value is None else _string(value, where, role)
    return out


def _file_records(path: Path, required, optional) -> list[dict[str, str]]:
    text = read_text(path)
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    if file_format(path) not in ("json", "jsonl"):
        raise UserError(f"data file {path}: expected .json or .jsonl (optionally .gz)")
    return [pick_fields(value, f"{path} {where}", required, optional) for where, value in json_values(path, text)]


def _tfds_records(spec: str, required, optional, data_dir: str | None) -> list[dict[str, str]]:
    from jaxgpt.data.tfds_source import open_tfds

    src = open_tfds(spec, data_dir)
    rows = []
    for start in range(0, len(src), 256):
        batch = src.__getitems__(list(range(start, min(len(src), start + 256))))
        rows += [pick_fields(rec, f"{spec} record {start + i}", required, optional) for i, rec in enumerate(batch)]
    return rows


def read_records(spec: str, required: Mapping[str, str], optional: Mapping[str, str] | None = None, *,
                 tfds_data_dir: str | None = None) -> list[dict[str, str]]:
    """Every record of `spec` as `{role: string}` (see the module docstring)."""
    from jaxgpt import datasets

    optional = dict(optional or {})
    spec = spec.strip()
    if not spec:
        raise UserError("data.path is empty; give a bundled data set name, a .json/.jsonl file or tfds:NAME")
    if spec.startswith("tfds:"):
        rows = _tfds_records(spec, required, optional, tfds_data_dir)
    elif spec in datasets.BUNDLED:
        entry = datasets.BUNDLED[spec]
        if entry.kind not in ("json", "jsonl"):
            raise UserError(f"bundled data set {spec!r} is {entry.kind} data, not JSON records; "
                            f"JSON ones: {', '.join(datasets.bundled_names('json') + datasets.bundled_names('jsonl'))}")
        rows = _file_records(datasets.bundled_path(spec), required, optional)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            raise UserError(f"data.path {spec} is a folder; give a .json or .jsonl file")
        if not path.is_file():
            raise UserError(f"data.path {spec!r} not found: neither a file, a bundled data set "
                            f"({', '.join(datasets.bundled_names('json') + datasets.bundled_names('jsonl'))}) "
                            "nor tfds:NAME")
        rows = _file_records(path, required, optional)
    if not rows:
        raise UserError(f"{spec} has no records")
    return rows
