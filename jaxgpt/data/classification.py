"""Labelled text for sequence classification: read, balance, split, tokenize, batch.

    data = load_classification(cfg.data, context_length=cfg.model.context_length)
    data.labels                       # ["ham", "spam"]: class id = index (sorted label names)
    data.train_batch(step, batch)     # {"tokens" [B, T], "lengths" [B], "labels" [B]}: int32
    for b in data.eval_batches("val", batch):   # + "weight" [B] float32 (0 on padding rows)
        ...

Sources (`data.path`):

* a bundled data set of kind `tsv` (default `sms-spam`, the SMS Spam Collection);
* a file: `.jsonl` (one JSON object a line; `.json` may also be one JSON array of objects),
  `.csv` (header row required; read with the `csv` module), or `.tsv`/`.txt`/anything else
  as TSV, with a header row naming `data.text_field` and `data.label_field`, or headerless
  `label<TAB>text` (the SMS file's layout; the text is everything after the first TAB).
  Any of these may be gzipped (`.gz`);
* `tfds:NAME[:SPLIT]`: records of a TFDS dataset (array_record; bundled ones are built
  locally, see `jaxgpt.data.tfds_builders`); `ClassLabel` ints become their names.

Labels are strings; the label list is sorted (numerically when every label is an integer),
so for SMS `ham` = 0 and `spam` = 1 as in the book. Balancing (`data.balance`) undersamples
every class to the smallest class's size, keeping a seeded random subset (`data.seed`); the
kept examples are then shuffled with the same seeded generator and split into train / val /
test: `n_train = int(n * (1 - val - test))`, `n_val = int(n * val)`, test = the rest. For SMS
that is 747 + 747 = 1494 -> 1045 / 149 / 300, the book's sizes (its pandas RNG is not
replicated, so the particular messages differ).

Texts are GPT-2 tokens truncated to `max_length` (`data.max_length`, or 0 = the longest
training example, capped by the model context) and right-padded with `<|endoftext|>`; each
row's `lengths` says where its real tokens end, and the classifier reads position
`lengths - 1`. An empty text is the single token `<|endoftext|>`.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxgpt.data.records import check_split_fractions, file_format, json_values, pick_fields, read_text, text_lines
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import EOT_ID, encode_batch

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassifyDataConfig:
    """The `data` section of classification tasks."""

    path: str = "sms-spam"  # bundled name | .jsonl/.json/.csv/.tsv file (optionally .gz) | tfds:NAME[:SPLIT]
    text_field: str = "text"  # column / key / tfds feature holding the text
    label_field: str = "label"  # column / key / tfds feature holding the label
    balance: bool = True  # undersample every class to the smallest class's count (seeded)
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # train gets the rest (0.7 by default)
    max_length: int = 0  # tokens per example; 0 = longest training example (capped by the context)
    seed: int = 123  # balancing, shuffling, splitting and the epoch order of training batches


def validate_data(cfg: ClassifyDataConfig, context_length: int) -> None:
    if not cfg.path or not cfg.path.strip():
        raise UserError("data.path is empty; give a bundled data set name, a file or tfds:NAME")
    check_split_fractions(cfg.val_fraction, cfg.test_fraction)
    if cfg.max_length < 0:
        raise UserError(f"data.max_length must be >= 0, got {cfg.max_length}")
    if cfg.max_length > context_length:
        raise UserError(f"data.max_length={cfg.max_length} is longer than the model's context "
                        f"(model.context_length={context_length})")
    if not cfg.text_field or not cfg.label_field:
        raise UserError("data.text_field and data.label_field must be non-empty")


# ---------------------------------------------------------------------------------------
# Reading records


def _label_text(value, where: str) -> str:
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
        labels.append(_label_text(rec[label_field], f"{path} {where}"))
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
            labels.append(_label_text(row[li], where))
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
            labels.append(_label_text(cols[li], f"{path} line {i}"))
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
        labels.append(_label_text(label, f"{path} line {i}"))
    return texts, labels


def read_file(path: str | Path, text_field: str = "text", label_field: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels) of a JSONL/JSON/CSV/TSV file (see the module docstring)."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    fmt = file_format(path)
    reader = {"jsonl": _read_jsonl, "json": _read_jsonl, "csv": _read_csv, "tsv": _read_tsv}[fmt]
    texts, labels = reader(path, text, text_field, label_field)
    if not texts:
        raise UserError(f"data file {path} has no examples")
    return texts, labels


def read_tfds(spec: str, text_field: str, label_field: str, data_dir: str | None = None):
    from jaxgpt.data.tfds_source import _text_of, open_tfds

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
    for start in range(0, n, 256):
        for rec in src.__getitems__(list(range(start, min(n, start + 256)))):
            texts.append(_text_of(rec[text_field], spec, text_field))
            value = rec[label_field]
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            if names and not isinstance(value, str):
                value = names[int(value)]
            labels.append(_label_text(value.item() if hasattr(value, "item") else value, f"{spec} record {start}"))
    return texts, labels


def read_examples(spec: str, text_field: str = "text", label_field: str = "label", *,
                  tfds_data_dir: str | None = None) -> tuple[list[str], list[str]]:
    """(texts, labels) of `data.path`: a bundled name, a file, or tfds:NAME[:SPLIT]."""
    from jaxgpt import datasets

    spec = spec.strip()
    if spec.startswith("tfds:"):
        return read_tfds(spec, text_field, label_field, tfds_data_dir)
    if spec in datasets.BUNDLED:
        entry = datasets.BUNDLED[spec]
        if entry.kind not in ("tsv", "csv", "jsonl", "json"):
            raise UserError(f"bundled data set {spec!r} is {entry.kind} data, not labelled examples; "
                            f"labelled: {', '.join(n for n in datasets.bundled_names() if datasets.BUNDLED[n].kind != 'text')}")
        # Bundled TSVs are headerless label<TAB>text whatever the field names are.
        return read_file(datasets.bundled_path(spec), text_field, label_field)
    path = Path(spec).expanduser()
    if path.is_file():
        return read_file(path, text_field, label_field)
    if path.exists():
        raise UserError(f"data.path {spec} is a folder; give a .jsonl, .json, .csv or .tsv file")
    labelled = [n for n in datasets.bundled_names() if datasets.BUNDLED[n].kind != "text"]
    raise UserError(f"data.path {spec!r} not found: neither a file, a bundled data set "
                    f"({', '.join(labelled)}) nor tfds:NAME")


# ---------------------------------------------------------------------------------------
# Labels, balancing, splitting


def label_list(labels: list[str]) -> list[str]:
    """Sorted distinct labels (numerically if all are integers); class id = index."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def balance_indices(label_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping `min(class count)` examples of every class (a random subset of the
    larger classes), in their original order."""
    counts = np.bincount(label_ids)
    n_min = int(counts[counts > 0].min())
    keep = []
    for c in range(len(counts)):
        idx = np.flatnonzero(label_ids == c)
        keep.append(idx if len(idx) == n_min else np.sort(rng.choice(idx, n_min, replace=False)))
    return np.sort(np.concatenate(keep))


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) as the book: int(n * train), int(n * val), the rest for test."""
    n_train = int(n * round(1.0 - val_fraction - test_fraction, 9))
    n_val = int(n * val_fraction)
    return n_train, n_val, n - n_train - n_val


@dataclass
class Split:
    tokens: np.ndarray  # int32 [n, T], EOT-padded
    lengths: np.ndarray  # int32 [n], 1..T
    labels: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[idx], "lengths": self.lengths[idx], "labels": self.labels[idx]}


def encode_texts(texts: list[str], max_length: int | None = None) -> list[list[int]]:
    ids = encode_batch(list(texts))
    ids = [t or [EOT_ID] for t in ids]
    return ids if max_length is None else [t[:max_length] for t in ids]


def pad_batch(ids: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad with <|endoftext|> (truncating to `length`): (tokens [n, length], lengths [n])."""
    tokens = np.full((len(ids), length), EOT_ID, np.int32)
    lengths = np.zeros(len(ids), np.int32)
    for i, t in enumerate(ids):
        t = t[:length]
        tokens[i, : len(t)] = t
        lengths[i] = len(t)
    return tokens, lengths


@dataclass
class ClassificationData:
    source: str
    labels: list[str]
    max_length: int
    splits: dict[str, Split]
    seed: int
    num_read: int

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.splits["train"]) // batch_size

    def train_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Batch number `step`: epoch `step // steps_per_epoch` is a fresh seeded permutation of
        the training set (the incomplete last batch dropped, as the book's loader); a pure
        function of (data.seed, step), so resuming replays the stream."""
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.splits["train"]))
        return self.splits["train"].take(perm[i * batch_size:(i + 1) * batch_size])

    def eval_batches(self, split: str, batch_size: int, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Every example of `split` once, in fixed-shape batches; the last is padded with
        weight-0 rows so sums over `weight` are exact."""
        data = self.splits[split]
        n = len(data)
        starts = range(0, n, batch_size)
        if max_batches:
            starts = list(starts)[:max_batches]
        for s in starts:
            idx = np.arange(s, min(s + batch_size, n))
            batch = data.take(idx)
            pad = batch_size - len(idx)
            weight = np.ones(batch_size, np.float32)
            if pad:
                weight[len(idx):] = 0.0
                batch = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
            batch["weight"] = weight
            yield batch

    def describe(self) -> str:
        sizes = " / ".join(f"{len(self.splits[s])} {s}" for s in SPLITS)
        return (f"{self.source}: {self.num_read} examples read, {sizes}; classes {self.labels}; "
                f"max_length {self.max_length} tokens")


def load_classification(cfg: ClassifyDataConfig, context_length: int, *,
                        tfds_data_dir: str | None = None) -> ClassificationData:
    """Read, label, balance, shuffle, split and tokenize `cfg.path` (see the module docstring)."""
    validate_data(cfg, context_length)
    texts, raw_labels = read_examples(cfg.path, cfg.text_field, cfg.label_field, tfds_data_dir=tfds_data_dir)
    labels = label_list(raw_labels)
    if len(labels) < 2:
        raise UserError(f"{cfg.path} has a single class ({labels[0]!r}) in data.label_field={cfg.label_field!r}; "
                        "classification needs at least two")
    index = {label: i for i, label in enumerate(labels)}
    label_ids = np.array([index[label] for label in raw_labels], np.int32)
    rng = np.random.default_rng(cfg.seed)
    keep = balance_indices(label_ids, rng) if cfg.balance else np.arange(len(label_ids))
    keep = keep[rng.permutation(len(keep))]
    n_train, n_val, n_test = split_sizes(len(keep), cfg.val_fraction, cfg.test_fraction)
    if n_train < 1:
        raise UserError(f"{cfg.path}: only {len(keep)} examples after balancing; too few to split")
    ids = encode_texts([texts[i] for i in keep])
    longest = max(len(t) for t in ids[:n_train])
    max_length = cfg.max_length or min(longest, context_length)
    tokens, lengths = pad_batch(ids, max_length)
    ys = label_ids[keep]
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(keep))}
    splits = {s: Split(tokens[a:b], lengths[a:b], ys[a:b]) for s, (a, b) in bounds.items()}
    return ClassificationData(cfg.path, labels, max_length, splits, cfg.seed, len(texts))
