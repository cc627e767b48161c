"""A `data.path` -> its records: bundled name, local file or folder, `hf:ORG/NAME` or `tfds:NAME`, one dispatch.

    rows = read_records("instruction-data", required={"instruction": "instruction", "output": "output"},
                        optional={"input": "input"})
    rows[0]   # {"instruction": "...", "output": "...", "input": ""}: keys are roles, values strings
    texts, labels = read_examples("sms-spam")   # labelled examples, for classification

The layer above the sources (`jaxgpt.data.bundled`, `jaxgpt.data.tfds_source`) and the file
readers (`jaxgpt.data.readers`), below the task datasets: every task whose examples are
records resolves its `data.path` here, so a spec means the same thing to all of them.
`read_records` serves the tasks whose records are JSON objects (instruction tuning,
preference pairs, GSM8K): `spec` is a bundled data set (kinds json / jsonl), a `.json` /
`.jsonl` file (optionally gzipped), a `.parquet` file, a folder of such files (shards, read in
path order as one), a Hugging Face hub data set's split (`hf:ORG/NAME[:SUBSET][:SPLIT]`,
downloaded once: `jaxgpt.data.hub_datasets`) or a tfds dataset (bytes features decoded as
UTF-8). `read_examples` serves classification: bundled tsv/csv/json(l), a
JSONL/JSON/CSV/TSV/parquet file or a folder of them, `hf:...`, or a tfds dataset (`ClassLabel`
ints become their names).
Every problem is a one-line UserError naming the file and record, or the config key to set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from jaxgpt.data import bundled as datasets
from jaxgpt.data.hub_datasets import hub_hint, hub_split, is_hub_spec
from jaxgpt.data.readers import (EXAMPLE_FORMATS, RECORD_FORMATS, files_below, label_text, pick_fields, read_file,
                                 read_json_records, read_record_file)
from jaxgpt.data.tfds_source import iter_records, open_tfds, text_of
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


# ---------------------------------------------------------------------------------------
# JSON records by role


def _tfds_records(spec: str, required, optional, instead, data_dir: str | None) -> list[dict]:
    src = open_tfds(spec, data_dir)
    return [pick_fields(rec, f"{spec} record {i}", required, optional, instead)
            for i, rec in enumerate(iter_records(src))]


def read_records(spec: str, required: Mapping[str, str], optional: Mapping[str, str] | None = None, *,
                 instead: Mapping[str, str] | None = None, tfds_data_dir: str | None = None) -> list[dict]:
    """Every record of `spec` as `{role: value}` (see `jaxgpt.data.readers.pick_fields`: a record
    holding a field of `instead`, a conversation's `messages`, is read by it instead of `required`)."""
    optional = dict(optional or {})
    spec = spec.strip()
    if not spec:
        raise UserError("data.path is empty; give a bundled data set name, a .json/.jsonl/.parquet file or folder, "
                        "hf:ORG/NAME or tfds:NAME")
    if spec.startswith("tfds:"):
        rows = _tfds_records(spec, required, optional, instead, tfds_data_dir)
    elif spec in datasets.BUNDLED:
        entry = datasets.BUNDLED[spec]
        if entry.kind not in ("json", "jsonl"):
            raise UserError(f"bundled data set {spec!r} is {entry.kind} data, not JSON records; "
                            f"JSON ones: {', '.join(datasets.bundled_names('json') + datasets.bundled_names('jsonl'))}")
        rows = read_json_records(datasets.bundled_path(spec), required, optional, instead)
    else:
        path = local_path(spec)
        if path.is_dir():
            rows = [row for f in files_below(path, RECORD_FORMATS)
                    for row in read_record_file(f, required, optional, instead)]
        elif path.is_file():
            rows = read_record_file(path, required, optional, instead)
        else:
            raise UserError(f"data.path {spec!r} not found: neither a file or folder, a bundled data set "
                            f"({', '.join(datasets.bundled_names('json') + datasets.bundled_names('jsonl'))}), "
                            f"hf:ORG/NAME nor tfds:NAME{hub_hint(spec)}")
    if not rows:
        raise UserError(f"{spec} has no records")
    return rows


# ---------------------------------------------------------------------------------------
# Labelled examples (classification)


def _tfds_examples(spec: str, text_field: str, label_field: str, data_dir: str | None) -> tuple[list[str], list[str]]:
    src = open_tfds(spec, data_dir)
    n = len(src)
    if n == 0:
        raise UserError(f"tfds dataset {spec!r} is empty")
    first = src[0]
    for field, kind in ((text_field, "text"), (label_field, "label")):
        if not isinstance(first, dict) or field not in first:
            have = ", ".join(sorted(first)) if isinstance(first, dict) else type(first).__name__
            raise UserError(f"tfds dataset {spec!r} has no {kind} feature {field!r} (it has: {have}); "
                            f"set data.{kind}_field")
    feature = None
    try:
        feature = src.dataset_info.features[label_field]
    except Exception:  # noqa: BLE001 - features without names: labels are used as they are
        pass
    names = list(getattr(feature, "names", None) or [])
    texts, labels = [], []
    for i, rec in enumerate(iter_records(src)):
        texts.append(text_of(rec[text_field], spec, text_field))
        value = rec[label_field]
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if names and not isinstance(value, str):
            value = names[int(value)]
        labels.append(label_text(value.item() if hasattr(value, "item") else value, f"{spec} record {i}"))
    return texts, labels


def read_examples(spec: str, text_field: str = "text", label_field: str = "label", *,
                  tfds_data_dir: str | None = None) -> tuple[list[str], list[str]]:
    """(texts, labels) of `data.path`: a bundled name, a file or folder, hf:ORG/NAME, or tfds:NAME[:SPLIT]."""
    spec = spec.strip()
    if spec.startswith("tfds:"):
        return _tfds_examples(spec, text_field, label_field, tfds_data_dir)
    if spec in datasets.BUNDLED:
        entry = datasets.BUNDLED[spec]
        if entry.kind not in ("tsv", "csv", "jsonl", "json"):
            raise UserError(f"bundled data set {spec!r} is {entry.kind} data, not labelled examples; "
                            f"labelled: {', '.join(n for n in datasets.bundled_names() if datasets.BUNDLED[n].kind != 'text')}")
        # Bundled TSVs are headerless label<TAB>text whatever the field names are.
        return read_file(datasets.bundled_path(spec), text_field, label_field)
    path = local_path(spec)
    if path.is_file():
        return read_file(path, text_field, label_field)
    if path.is_dir():
        pairs = [read_file(f, text_field, label_field) for f in files_below(path, EXAMPLE_FORMATS)]
        return [t for texts, _ in pairs for t in texts], [label for _, labels in pairs for label in labels]
    labelled = [n for n in datasets.bundled_names() if datasets.BUNDLED[n].kind != "text"]
    raise UserError(f"data.path {spec!r} not found: neither a file or folder, a bundled data set "
                    f"({', '.join(labelled)}), hf:ORG/NAME nor tfds:NAME{hub_hint(spec)}")


def local_path(spec: str) -> Path:
    """A file or folder `data.path` on this machine: `hf:...` is the downloaded split's folder
    (`jaxgpt.data.hub_datasets`), anything else a path."""
    if is_hub_spec(spec):
        return hub_split(spec)
    return Path(spec).expanduser()
