"""`tfds:NAME[:SPLIT]` sources: records read with `tensorflow_datasets.data_source`.

`data_source` opens array_record (or parquet) files with random access and no TensorFlow.
Nothing is downloaded: builders in `jaxgpt.data.tfds_builders` (the bundled data sets) are
built locally on first use; any other dataset must already be prepared in tfds' data_dir
in array_record format (`tfds build NAME --file_format=array_record`).

Every reader of tfds records (corpus documents here, JSON-style records and labelled
examples in `jaxgpt.data.records`) opens them with `open_tfds` and walks them with
`iter_records`, which reads `RECORDS_PER_READ` records per call (one `__getitems__` is much
faster than as many `__getitem__`s, and memory stays bounded on a large dataset).
tensorflow_datasets itself is imported only inside the functions that open a dataset.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from jaxgpt.data import tfds_builders
from jaxgpt.data.text import Source, slugify, split_text
from jaxgpt.errors import UserError

_SPEC = re.compile(r"^(?P<name>[^:\[\]]+?(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")
RECORDS_PER_READ = 256


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """"tfds:NAME[/CONFIG][:VERSION][:SPLIT]" -> (name, split); split defaults to "train"."""
    m = _SPEC.match(spec[len("tfds:"):].strip())
    if not m:
        raise UserError(f"data.path {spec!r} is not tfds:NAME or tfds:NAME:SPLIT")
    return m.group("name"), m.group("split") or "train"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def text_of(value, spec: str, field: str) -> str:
    """Feature `field` of a record of `spec` as text (bytes decoded as UTF-8)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"tfds dataset {spec}: feature {field!r} holds bytes that are not UTF-8") from None
    if isinstance(value, str):
        return value
    raise UserError(f"tfds dataset {spec}: feature {field!r} is {type(value).__name__}, not text; set data.text_field")


def open_tfds(spec: str, data_dir: str | None = None):
    """The random-access data source of a tfds spec (building a bundled one if needed)."""
    import tensorflow_datasets as tfds  # lazy: slow to import, and only tfds: sources need it

    name, split = parse_tfds_spec(spec)
    try:
        if tfds_builders.local_builder_class(name) is not None:
            tfds_builders.prepare_local(name, data_dir)
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except UserError:
        raise
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"unknown tfds dataset {name!r} in {spec!r}; prepare it first "
            f"(tfds build {name} --file_format=array_record) or check the name"
        ) from None
    except Exception as e:  # unknown split, not prepared, tfrecord-only, ...
        raise UserError(f"cannot open tfds dataset {spec!r}: {_first_line(e)}") from None


def iter_records(src) -> Iterator[dict]:
    """Every record of a data source (`open_tfds`), in order, `RECORDS_PER_READ` per read."""
    n = len(src)
    for start in range(0, n, RECORDS_PER_READ):
        yield from src.__getitems__(list(range(start, min(n, start + RECORDS_PER_READ))))


def tfds_source(spec: str, text_field: str, data_dir: str | None, chunk_chars: int) -> Source:
    """A corpus `Source` (`jaxgpt.data.text`) whose documents are the records' `text_field`."""
    src = open_tfds(spec, data_dir)
    n = len(src)
    if n == 0:
        raise UserError(f"corpus {spec!r} is empty (0 records); choose another split or dataset")
    record = src[0]
    if not isinstance(record, dict) or text_field not in record:
        have = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"tfds dataset {spec!r} has no feature {text_field!r} (it has: {have}); set data.text_field")
    text_of(record[text_field], spec, text_field)

    info = src.dataset_info
    files = []
    root = Path(str(info.data_dir))
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        st = p.stat()
        files.append([p.name, st.st_size, st.st_mtime_ns])
    name, split = parse_tfds_spec(spec)
    fingerprint = {"tfds": info.full_name, "split": split, "records": n, "text_field": text_field, "files": files}

    def documents() -> Iterator[Iterator[str]]:
        for rec in iter_records(src):
            yield split_text(text_of(rec[text_field], spec, text_field), chunk_chars)

    key = f"tfds:{info.full_name}:{split}:{text_field}@{root}"
    return Source(spec, key, slugify(f"tfds-{name}-{split}"), fingerprint, documents)
