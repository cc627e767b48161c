"""Corpus -> on-disk token file, tokenized once, streamed, reused while the source is unchanged.

A *source* (`data.path`) is one of

* a bundled corpus name (`"the-verdict"`, see `jaxgpt.data.bundled`),
* a UTF-8 text file (one document; gunzipped when its name ends in `.gz`),
* a JSON Lines file (`.jsonl`, `.jsonl.gz`): each line's `text_field` is a document,
* a parquet file (`.parquet`, Hugging Face datasets' format; needs pyarrow): each row's
  `text_field` column is a document,
* a folder: every `*.txt`, `*.txt.gz`, `*.jsonl`, `*.jsonl.gz` and `*.parquet` below it,
  recursively, in sorted relative-path order,
* `"hf:ORG/NAME[:SUBSET][:SPLIT]"`: a Hugging Face hub data set's split (default train),
  downloaded once into the cache and read as a folder (`jaxgpt.data.hub_datasets`),
* `"tfds:NAME"` or `"tfds:NAME:SPLIT"` (split defaults to `train`; NAME may carry a config
  and version, `"tfds:wiki/en:1.0.0:train[:10%]"`), read with `tensorflow_datasets.data_source`
  (random access over array_record; no TensorFlow). Each record's `text_field` is a document.

Text is encoded with the run's tokenizer (`jaxgpt.text.tokenizer`; default GPT-2's).
Documents (folder files, JSON Lines, parquet and tfds records) are joined with one end-of-text
token (the tokenizer's eos, GPT-2's `<|endoftext|>` 50256) between them, none before the first or
after the last; a single file is one document, so its tokens are exactly `tokenizer.encode(file_text)`
(a literal `<|endoftext|>` in the text is the special token, as in the book's `GPTDatasetV1`).

The token file is a flat array of the smallest little-endian unsigned type that holds the
vocabulary (uint16 for GPT-2's 50,257 ids, uint32 above 65,536: Llama 3, Qwen3, Gemma 3), named
`<name>-<key>.bin` (the key covers the source and the tokenizer), with a JSON sidecar (`.json`:
source, fingerprint, token count, dtype, tokenizer, sha256 of the token file). Text is read and
encoded in ~1 MB chunks cut only where BPE cannot merge across the cut (`jaxgpt.data.text`;
tfds records come from `jaxgpt.data.tfds_source`), and tokens are appended to a temporary
file that is renamed into place when complete, then the sidecar is written the same way: a
killed run leaves at most a `*.tmp-*` file (removed by the next run on that host once its
writer is dead), never a truncated file that is trusted. A later call reuses the file only
when the sidecar's fingerprint matches the source now and the token file matches the
sidecar: its size always, its sha256 (whole file up to `VERIFY_FULL` bytes, else its first
and last `VERIFY_ENDS` bytes) too.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from jaxgpt.data import bundled as datasets
from jaxgpt.data.hub_datasets import hub_hint, hub_split, is_hub_spec
from jaxgpt.data.parquet import is_parquet, parquet_documents
from jaxgpt.data.text import CHUNK_CHARS, Source, is_jsonl, is_text, jsonl_documents, read_text_chunks, slugify
from jaxgpt.data.tfds_source import tfds_source
from jaxgpt.errors import UserError
from jaxgpt.io.files import disk_full_as
from jaxgpt.text.tokenizer import Tokenizer, gpt2_tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HASH_LIMIT = 16 << 20  # files up to this size are fingerprinted by content, larger by size+mtime
VERIFY_FULL = 1 << 30  # token files up to this size are fully re-hashed when reused
VERIFY_ENDS = 16 << 20  # larger ones: the sha256 of their first and last this many bytes


# ---------------------------------------------------------------------------------------
# Sources


def _file_fingerprint(path: Path, rel: str) -> list:
    st = path.stat()
    if st.st_size <= HASH_LIMIT:
        return [rel, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
    return [rel, st.st_size, st.st_mtime_ns]


def resolve_source(
    spec: str, text_field: str = "text", tfds_data_dir: str | None = None, chunk_chars: int = CHUNK_CHARS
) -> Source:
    """Interpret `data.path`; UserError if it names nothing usable."""
    if not spec or not spec.strip():
        raise UserError("data.path is empty; give a bundled corpus name, a text file, a folder, hf:ORG/NAME or "
                        "tfds:NAME")
    if spec.startswith("tfds:"):
        return tfds_source(spec, text_field, tfds_data_dir, chunk_chars)
    if spec in datasets.BUNDLED:
        entry = datasets.BUNDLED[spec]
        if entry.kind != "text":
            raise UserError(
                f"bundled data set {spec!r} is {entry.kind} data, not a text corpus; "
                f"text corpora: {', '.join(datasets.bundled_names('text'))}"
            )
        path = datasets.bundled_path(spec)
        return Source(spec, f"bundled:{spec}", slugify(spec), {"files": [_file_fingerprint(path, entry.file)]},
                      lambda: [read_text_chunks(path, chunk_chars)])
    path = hub_split(spec) if is_hub_spec(spec) else Path(spec).expanduser()
    if path.is_file():
        path = path.resolve()
        fp = {"files": [_file_fingerprint(path, path.name)]}
        if is_records(path):
            first = _record_documents(path, text_field, chunk_chars)
            next(first, None)  # the first record's errors (a wrong data.text_field) before any work
            first.close()
            kind = "parquet" if is_parquet(path) else "jsonl"
            return Source(spec, f"{kind}:{path}:{text_field}", slugify(path.name.split(".")[0]),
                          {**fp, "text_field": text_field}, lambda: _record_documents(path, text_field, chunk_chars))
        return Source(spec, f"file:{path}", slugify(path.stem), fp, lambda: [read_text_chunks(path, chunk_chars)])
    if path.is_dir():
        path = path.resolve()
        files = sorted((p for p in path.rglob("*") if p.is_file() and (is_text(p) or is_records(p))),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise UserError(f"folder {path} has no .txt, .jsonl or .parquet files; data.path needs a folder of "
                            "*.txt(.gz) documents or *.jsonl(.gz) / *.parquet records")
        fp = {"files": [_file_fingerprint(p, p.relative_to(path).as_posix()) for p in files]}
        records = any(map(is_records, files))  # then the text field picks what is read: part of the key
        if records:
            fp["text_field"] = text_field
        return Source(spec, f"dir:{path}" + (f":{text_field}" if records else ""), slugify(path.name), fp,
                      lambda: _folder_documents(files, text_field, chunk_chars))
    raise UserError(
        f"data.path {spec!r} is neither a bundled corpus ({', '.join(datasets.bundled_names('text'))}) "
        f"nor an existing file or folder, nor hf:ORG/NAME or tfds:NAME{hub_hint(spec)}"
    )


def is_records(path: Path) -> bool:
    """A corpus file whose records' `data.text_field` are its documents (JSON Lines, parquet)."""
    return is_jsonl(path) or is_parquet(path)


def _record_documents(path: Path, text_field: str, chunk_chars: int) -> Iterator[Iterable[str]]:
    if is_parquet(path):
        return parquet_documents(path, text_field, chunk_chars)
    return jsonl_documents(path, text_field, chunk_chars)


def _folder_documents(files: list[Path], text_field: str, chunk_chars: int) -> Iterator[Iterable[str]]:
    for p in files:
        if is_records(p):
            yield from _record_documents(p, text_field, chunk_chars)
        else:
            yield read_text_chunks(p, chunk_chars)


# ---------------------------------------------------------------------------------------
# Tokenizing into the cache


def default_cache_dir() -> Path:
    """`$JAXGPT_CACHE/tokens` if that variable is set, else `~/.cache/jaxgpt/tokens`."""
    root = os.environ.get("JAXGPT_CACHE")
    return Path(root).expanduser() / "tokens" if root else Path.home() / ".cache" / "jaxgpt" / "tokens"


def _pieces(documents: Iterable[Iterable[str]]) -> Iterator[str | None]:
    """Text pieces, with None where an <|endoftext|> goes (between non-empty documents)."""
    first = True
    for doc in documents:
        it = iter(doc)
        head = next((piece for piece in it if piece), None)
        if head is None:
            continue
        if not first:
            yield None
        first = False
        yield head
        yield from it


def _write_tokens(source: Source, out, chunk_chars: int, num_threads: int, tokenizer: Tokenizer) -> tuple[int, str]:
    """Encode `source` into the open binary file `out`; returns (token count, sha256)."""
    count = 0
    digest = hashlib.sha256()
    batch: list[str | None] = []
    chars = 0

    def flush() -> None:
        nonlocal count, chars
        encoded = iter(tokenizer.encode_batch([p for p in batch if p is not None], num_threads=num_threads))
        ids: list[int] = []
        for piece in batch:
            ids.extend([tokenizer.eos_id] if piece is None else next(encoded))
        data = np.asarray(ids, dtype=tokenizer.token_dtype).tobytes()
        out.write(data)
        digest.update(data)
        count += len(ids)
        batch.clear()
        chars = 0

    for piece in _pieces(source.documents()):
        batch.append(piece)
        chars += len(piece) if piece else 1
        if chars >= chunk_chars * num_threads or len(batch) >= 4096:
            flush()
    if batch:
        flush()
    return count, digest.hexdigest()


def _tmp_prefix(path: Path) -> str:
    return f"{path.name}.tmp-{socket.gethostname()}-"


def _atomic_write(path: Path, write: Callable) -> object:
    """Run `write(file)` on a unique temp file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return result
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _cache_write(what: str, path: Path) -> Iterator[None]:
    """A full disk is one `DiskFull` line, another write error (a read-only cache) one `UserError`;
    `_atomic_write` has removed its temporary either way."""
    try:
        with disk_full_as(what, path):
            yield
    except OSError as e:
        raise UserError(f"cannot write {what} {path} ({e.strerror or e}); set data.cache_dir to a writable "
                        "folder") from None


def token_file_paths(source: Source, cache_dir: str | Path = "", tokenizer_name: str = "gpt2") -> tuple[Path, Path]:
    """(`.bin`, `.json`) cache paths of `source` (named by its key and the tokenizer's name:
    GPT-2's files keep the names they always had)."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, tokenizer_name, source.key]).encode()).hexdigest()[:16]
    stem = f"{source.slug}-{digest}"
    return cache / f"{stem}.bin", cache / f"{stem}.json"


def _remove_stale_temporaries(path: Path) -> None:
    """Delete this host's temp files of `path` whose writer is no longer running (a killed
    tokenization); another host's, or a live writer's, are left alone."""
    prefix = _tmp_prefix(path)
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ends_sha256(path: Path, size: int) -> str:
    """sha256 of the file, or for one over `VERIFY_FULL` bytes, of its first and last
    `VERIFY_ENDS` bytes (a cheap check that still catches a file swapped or cut)."""
    with open(path, "rb") as f:
        if size <= VERIFY_FULL:
            return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256(f.read(VERIFY_ENDS))
        f.seek(size - VERIFY_ENDS)
        digest.update(f.read(VERIFY_ENDS))
    return digest.hexdigest()


def _cached_count(bin_path: Path, meta_path: Path, fingerprint: dict, dtype: str) -> int | None:
    try:
        meta = json.loads(meta_path.read_text())
        n = int(meta["tokens"])
        size = np.dtype(dtype).itemsize * n
        ok = (meta.get("format") == FORMAT_VERSION and meta.get("dtype") == dtype
              and meta.get("fingerprint") == fingerprint and n > 0 and bin_path.stat().st_size == size)
        if ok and "check_sha256" in meta:  # sidecars from before hashes: the size check only
            ok = _ends_sha256(bin_path, size) == meta["check_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return n if ok else None


def prepare_token_file(
    source: str,
    cache_dir: str | Path = "",
    text_field: str = "text",
    *,
    tfds_data_dir: str | None = None,
    chunk_chars: int = CHUNK_CHARS,
    num_threads: int = 0,
    tokenizer: Tokenizer | None = None,
) -> tuple[Path, int]:
    """Tokenize `source` into the cache unless an up-to-date token file exists.

    Returns (path of the `.bin`, number of tokens); the file's dtype is `tokenizer.token_dtype`.
    `num_threads` 0 = up to 4; `tokenizer` defaults to GPT-2's.
    """
    tokenizer = tokenizer or gpt2_tokenizer()
    dtype = tokenizer.token_dtype
    src = resolve_source(source, text_field, tfds_data_dir, chunk_chars)
    fingerprint = json.loads(json.dumps(src.fingerprint))  # as it reads back from JSON
    bin_path, meta_path = token_file_paths(src, cache_dir, tokenizer.name)
    n = _cached_count(bin_path, meta_path, fingerprint, dtype)
    if n is not None:
        return bin_path, n
    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create token cache folder {bin_path.parent} ({e.strerror}); set data.cache_dir") from None
    _remove_stale_temporaries(bin_path)
    _remove_stale_temporaries(meta_path)
    threads = num_threads or max(1, min(4, os.cpu_count() or 1))
    t0 = time.time()
    with _cache_write("the corpus's token file", bin_path):
        n, sha256 = _atomic_write(bin_path, lambda f: _write_tokens(src, f, chunk_chars, threads, tokenizer))
    if n == 0:
        bin_path.unlink(missing_ok=True)
        raise UserError(f"corpus {source!r} is empty (0 tokens); point data.path at a corpus with text in it")
    size = np.dtype(dtype).itemsize * n
    check = sha256 if size <= VERIFY_FULL else _ends_sha256(bin_path, size)
    meta = {"format": FORMAT_VERSION, "source": src.key, "spec": source, "fingerprint": fingerprint,
            "tokens": n, "dtype": dtype, "tokenizer": tokenizer.name, "sha256": sha256, "check_sha256": check,
            "seconds": round(time.time() - t0, 3)}
    with _cache_write("the token file's sidecar", meta_path):
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    log.info("tokenized %s: %d tokens -> %s", source, n, bin_path)
    return bin_path, n


def prepare_tokens(
    source: str,
    cache_dir: str | Path = "",
    text_field: str = "text",
    *,
    tfds_data_dir: str | None = None,
    chunk_chars: int = CHUNK_CHARS,
    num_threads: int = 0,
    tokenizer: Tokenizer | None = None,
) -> np.ndarray:
    """The corpus as a read-only memmap of token ids (uint16 or uint32), shape [N] (tokenized once).

    `source` is `data.path`, `cache_dir` is `data.cache_dir` ("" = `default_cache_dir()`),
    `text_field` is `data.text_field` (tfds and JSON Lines sources), `tfds_data_dir` is tfds'
    data_dir (None = tfds' default, `$TFDS_DATA_DIR` or ~/tensorflow_datasets), `tokenizer` the
    run's (default GPT-2's).
    """
    tokenizer = tokenizer or gpt2_tokenizer()
    path, n = prepare_token_file(source, cache_dir, text_field, tfds_data_dir=tfds_data_dir,
                                 chunk_chars=chunk_chars, num_threads=num_threads, tokenizer=tokenizer)
    return np.memmap(path, dtype=tokenizer.token_dtype, mode="r", shape=(n,))
