"""`tfds:NAME[:SPLIT]` corpus sources: documents read with `tensorflow_datasets.data_source`.

`data_source` opens array_record (or parquet) files with random access and no TensorFlow.
Nothing is downloaded: builders in `jaxgpt.data.tfds_builders` (the bundled corpora) are
built locally on first use; any other dataset must already be prepared in tfds' data_dir
in array_record format (`tfds build NAME --file_format=array_record`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from jaxgpt.errors import UserError

_SPEC = re.compile(r"^(?P<name>[^:\[\]]+?(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")
_RECORDS_PER_READ = 256


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """"tfds:NAME[/CONFIG][:VERSION][:SPLIT]" -> (name, split); split defaults to "train"."""
    m = _SPEC.match(spec[len("tfds:"):].strip())
    if not m:
        raise UserError(f"data.path {spec!r} is not tfds:NAME or tfds:NAME:SPLIT")
    return m.group("name"), m.group("split") or "train"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _text_of(value, spec: str, field: str) -> str:
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
    import tensorflow_datasets as tfds

    from jaxgpt.data import tfds_builders

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


def tfds_source(spec: str, text_field: str, data_dir: str | None, chunk_chars: int):
    """A `jaxgpt.data.tokens.Source` whose documents are the records' `text_field`."""
    from jaxgpt.data.tokens import Source, _slug, split_text

    src = open_tfds(spec, data_dir)
    n = len(src)
    if n == 0:
        raise UserError(f"corpus {spec!r} is empty (0 records); choose another split or dataset")
    record = src[0]
    if not isinstance(record, dict) or text_field not in record:
        have = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"tfds dataset {spec!r} has no feature {text_field!r} (it has: {have}); set data.text_field")
    _text_of(record[text_field], spec, text_field)

    info = src.dataset_info
    files = []
    root = Path(str(info.data_dir))
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        st = p.stat()
        files.append([p.name, st.st_size, st.st_mtime_ns])
    name, split = parse_tfds_spec(spec)
    fingerprint = {"tfds": info.full_name, "split": split, "records": n, "text_field": text_field, "files": files}

    def documents() -> Iterator[Iterator[str]]:
        for start in range(0, n, _RECORDS_PER_READ):
            keys = list(range(start, min(n, start + _RECORDS_PER_READ)))
            for rec in src.__getitems__(keys):
                yield split_text(_text_of(rec[text_field], spec, text_field), chunk_chars)

    key = f"tfds:{info.full_name}:{split}:{text_field}@{root}"
    return Source(spec, key, _slug(f"tfds-{name}-{split}"), fingerprint, documents)
