"""Pretraining data: corpus -> cached token file -> windows -> resumable batches.

    tokens = prepare_tokens(cfg.data.path, cfg.data.cache_dir, cfg.data.text_field)  # uint16 [N]
    context_length = cfg.data.context_length or cfg.model.context_length
    splits = make_splits(tokens, context_length, cfg.data.stride, cfg.data.val_ratio)
    sampler = BatchSampler(splits.train, cfg.train.batch_size, seed=cfg.data.seed)
    batch = sampler.batch(step)            # {"inputs", "targets"}: int32 [B, T]
    for b in eval_batches(splits.val, B):  # + "mask": float32 [B, T]
        ...

`load_splits(cfg.data, context_length)` does the first two lines; `pretraining_data(cfg)`
is all of it, in the shape `jaxgpt.tasks.pretrain` uses. TFDS builders for the
bundled corpora live in `jaxgpt.data.tfds_builders` (imported only for `tfds:` sources).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from jaxgpt.data.tokens import default_cache_dir, prepare_token_file, prepare_tokens, resolve_source
from jaxgpt.data.windows import (
    BatchSampler,
    Splits,
    Windows,
    eval_batches,
    make_splits,
    num_eval_batches,
    split_tokens,
)

__all__ = [
    "BatchSampler", "PretrainingData", "pretraining_data", "Splits", "Windows", "default_cache_dir", "eval_batches", "load_splits",
    "make_splits", "num_eval_batches", "prepare_token_file", "prepare_tokens", "resolve_source",
    "split_tokens",
]


def load_splits(data, context_length: int, *, tfds_data_dir: str | None = None, tokenizer=None) -> Splits:
    """Tokens of `data.path` (a `DataConfig`), cut into train/val windows."""
    tokens = prepare_tokens(data.path, data.cache_dir, data.text_field, tfds_data_dir=tfds_data_dir,
                            tokenizer=tokenizer)
    return make_splits(tokens, context_length, data.stride, data.val_ratio, name=repr(data.path))


@dataclass
class PretrainingData:
    """This process's view of the pretraining data (what the trainer consumes).

    `train_batch(step)`: {"inputs", "targets"} int32 [B/P, T], a pure function of
    (data.seed, step), so resuming at `step` replays the same stream.
    `val_batches(max_batches)`: every val window once, {"inputs", "targets", "mask"}, with
    [B/P, T] leaves (mask float32, 0 on padding rows); nothing when val_ratio is 0.
    `train_eval_batches(max_batches)`: the same for the first train windows, in order.
    """

    source: str
    num_tokens: int
    splits: Splits
    sampler: BatchSampler
    batch_size: int  # global
    process_index: int = 0
    process_count: int = 1

    @property
    def context_length(self) -> int:
        return self.splits.train.context_length

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        return self.sampler.batch(step)

    def val_batches(self, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        if self.splits.val is None:
            return iter(())
        return eval_batches(self.splits.val, self.batch_size, max_batches,
                            self.process_index, self.process_count)

    def train_eval_batches(self, max_batches: int) -> Iterator[dict[str, np.ndarray]]:
        """The first `max_batches` batches of train windows in corpus order (capped at all
        of them), shaped like `val_batches`: a fixed set to score in eval mode."""
        return eval_batches(self.splits.train, self.batch_size, max_batches,
                            self.process_index, self.process_count)

    def describe(self) -> str:
        val = self.splits.val
        val_text = f"{len(val):,} val windows" if val is not None else "no val split"
        return (f"{self.source} ({self.num_tokens:,} tokens): {len(self.splits.train):,} train windows "
                f"(stride {self.splits.train.stride}), {val_text}")


def pretraining_data(cfg, process_index: int = 0, process_count: int = 1, *,
                     tfds_data_dir: str | None = None, tokenizer=None) -> PretrainingData:
    """Token file, splits and sampler for a full `Config` (data, train.batch_size; windows are
    `data.context_length` long, or the model's context when that is 0).

    Val batches use the training batch size (so they shard over devices the same way);
    `tokenizer`: the model's (default GPT-2's).
    """
    tokens = prepare_tokens(cfg.data.path, cfg.data.cache_dir, cfg.data.text_field, tfds_data_dir=tfds_data_dir,
                            tokenizer=tokenizer)
    context_length = cfg.data.context_length or cfg.model.context_length
    splits = make_splits(tokens, context_length, cfg.data.stride, cfg.data.val_ratio,
                         name=repr(cfg.data.path))
    sampler = BatchSampler(splits.train, cfg.train.batch_size, seed=cfg.data.seed,
                           process_index=process_index, process_count=process_count)
    return PretrainingData(cfg.data.path, len(tokens), splits, sampler, cfg.train.batch_size,
                           process_index, process_count)
