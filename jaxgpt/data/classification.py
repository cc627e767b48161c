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

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from jaxgpt.data.records import check_split_fractions, read_examples
from jaxgpt.errors import UserError
from jaxgpt.text.tokenizer import Tokenizer, gpt2_tokenizer

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


def encode_texts(texts: list[str], max_length: int | None = None, tokenizer: Tokenizer | None = None) -> list[list[int]]:
    """Token ids of each text (an empty text is one end-of-text token), cut to `max_length`."""
    tokenizer = tokenizer or gpt2_tokenizer()
    ids = tokenizer.encode_batch(list(texts))
    ids = [t or [tokenizer.eos_id] for t in ids]
    return ids if max_length is None else [t[:max_length] for t in ids]


def pad_batch(ids: list[list[int]], length: int, pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad with `pad_id` (default GPT-2's <|endoftext|>), truncating to `length`:
    (tokens [n, length], lengths [n])."""
    tokens = np.full((len(ids), length), gpt2_tokenizer().pad_id if pad_id is None else pad_id, np.int32)
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


def load_classification(cfg: ClassifyDataConfig, context_length: int, *, tfds_data_dir: str | None = None,
                        tokenizer: Tokenizer | None = None) -> ClassificationData:
    """Read, label, balance, shuffle, split and tokenize `cfg.path` (see the module docstring)."""
    tokenizer = tokenizer or gpt2_tokenizer()
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
    ids = encode_texts([texts[i] for i in keep], tokenizer=tokenizer)
    longest = max(len(t) for t in ids[:n_train])
    max_length = cfg.max_length or min(longest, context_length)
    tokens, lengths = pad_batch(ids, max_length, tokenizer.pad_id)
    ys = label_ids[keep]
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(keep))}
    splits = {s: Split(tokens[a:b], lengths[a:b], ys[a:b]) for s, (a, b) in bounds.items()}
    return ClassificationData(cfg.path, labels, max_length, splits, cfg.seed, len(texts))
