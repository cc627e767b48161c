"""Windows over a token stream, train/val split, and resumable, shardable batches.

Book semantics (Raschka, *Build a Large Language Model (From Scratch)*, ch. 2,
`GPTDatasetV1`): window i holds inputs `tokens[i*stride : i*stride + T]` and targets
`tokens[i*stride + 1 : i*stride + T + 1]` (the inputs shifted left by one token), for every
i with `i*stride + T + 1 <= N`. So a stream of N tokens has `(N - T - 1) // stride + 1`
windows (0 if N < T + 1), exactly `len(range(0, N - T, stride))` as in the book.

Windows are sliced from the (memmapped) token array only when a batch asks for them.

Training order (`BatchSampler`): the stream of windows is epoch 0's permutation, then
epoch 1's, ... (each `np.random.default_rng((seed, epoch)).permutation(W)`), and batch n is
positions `[n*B, (n+1)*B)` of that endless stream. So batch n is a pure function of
(seed, n) (resuming at step n replays exactly the same data); every window is seen once per
epoch; no incomplete batch is ever dropped or padded, because batches simply continue into
the next epoch. That is also what lets a tiny corpus train with a fixed batch shape: the
default corpus at T=256 has 18 train windows, fewer than some batch sizes, and then a batch
spans epochs (and may hold the same window twice, once from each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from jaxgpt.errors import UserError


@dataclass(frozen=True)
class Windows:
    """Lazy view of the windows of a 1-D token array (e.g. a uint16 memmap).

    `tokens`: [N] token ids; `context_length`: T; `stride`: S (> 0).
    """

    tokens: np.ndarray
    context_length: int
    stride: int

    def __post_init__(self):
        if self.context_length <= 0 or self.stride <= 0:
            raise UserError(f"context_length and stride must be positive, got {self.context_length}, {self.stride}")

    def __len__(self) -> int:
        n, t = len(self.tokens), self.context_length
        return 0 if n < t + 1 else (n - t - 1) // self.stride + 1

    @property
    def num_target_tokens(self) -> int:
        return len(self) * self.context_length

    def take(self, indices) -> dict[str, np.ndarray]:
        """Windows `indices` ([B] ints) as {"inputs": int32 [B, T], "targets": int32 [B, T]}."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"window index out of range [0, {len(self)})")
        # One [B, T+1] gather reads only the rows needed from the memmap.
        rows = idx[:, None] * self.stride + np.arange(self.context_length + 1, dtype=np.int64)
        block = np.asarray(self.tokens[rows], dtype=np.int32)
        return {"inputs": block[:, :-1], "targets": block[:, 1:]}

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [T], targets [T]) of window i, int32."""
        b = self.take([i])
        return b["inputs"][0], b["targets"][0]


@dataclass(frozen=True)
class Splits:
    train: Windows
    val: Windows | None  # None when val_ratio == 0


def split_tokens(tokens: np.ndarray, val_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """First `int(N * (1 - val_ratio))` tokens are train, the rest val (views, no copy)."""
    if not 0.0 <= val_ratio < 1.0:
        raise UserError(f"data.val_ratio must be in [0, 1), got {val_ratio}")
    n_train = int(len(tokens) * (1.0 - val_ratio))
    return tokens[:n_train], tokens[n_train:]


def make_splits(
    tokens: np.ndarray,
    context_length: int,
    stride: int = 0,
    val_ratio: float = 0.1,
    name: str = "the corpus",
    val_stride: int = 0,
) -> Splits:
    """Train and val windows of a token stream.

    `stride` 0 means `context_length` (non-overlapping windows). Val windows use
    `val_stride` (0 = `context_length`), so each val token is scored at most once and the
    val loss is a plain token mean, whatever the training stride. Each split must hold at
    least one window (T + 1 tokens), else UserError saying which knob to turn.
    """
    stride = stride or context_length
    val_stride = val_stride or context_length
    train_tok, val_tok = split_tokens(tokens, val_ratio)
    need = context_length + 1
    if len(train_tok) < need:
        raise UserError(
            f"corpus {name} has {len(train_tok):,} train tokens, fewer than one window of "
            f"context_length+1={need:,}; use a smaller model.context_length or a larger corpus"
        )
    val = None
    if val_ratio > 0:
        if len(val_tok) < need:
            raise UserError(
                f"corpus {name} has {len(val_tok):,} validation tokens, fewer than one window of "
                f"context_length+1={need:,}; use a smaller model.context_length, a larger "
                "data.val_ratio, or data.val_ratio=0 to skip validation"
            )
        val = Windows(val_tok, context_length, val_stride)
    return Splits(Windows(train_tok, context_length, stride), val)


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise UserError(
            f"batch size {batch_size} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    return batch_size // process_count


class BatchSampler:
    """Training batches: batch n is a pure function of (seed, n); see the module docstring.

    `batch_size` is the *global* batch B. With `process_count` P, process p gets rows
    `[p*B/P, (p+1)*B/P)` of global batch n, so the P local batches stacked in process order
    are exactly the single-process batch. `batch(n)` returns
    {"inputs": int32 [B/P, T], "targets": int32 [B/P, T]}.
    """

    def __init__(self, windows: Windows, batch_size: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if len(windows) == 0:
            raise UserError("no training windows: the corpus is shorter than context_length + 1 tokens")
        self.local_batch_size = _check_sharding(batch_size, process_index, process_count)
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    def epoch(self, n: int) -> float:
        """Epochs completed before batch n (fractional): n * B / W."""
        return n * self.batch_size / self.num_windows

    def _order(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            w = self.num_windows
            perm = np.random.default_rng((self.seed, epoch)).permutation(w) if self.shuffle else np.arange(w)
            if len(self._perms) >= 4:  # a batch spans at most a few epochs; keep memory flat
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def indices(self, n: int) -> np.ndarray:
        """Window indices of this process's rows of global batch n, [B/P] int64."""
        if n < 0:
            raise ValueError(f"batch number must be >= 0, got {n}")
        w = self.num_windows
        lo = n * self.batch_size + self.process_index * self.local_batch_size
        pos = np.arange(lo, lo + self.local_batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(pos, w)
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._order(int(e))[offsets[sel]]
        return out

    def batch(self, n: int) -> dict[str, np.ndarray]:
        """This process's part of global batch n: inputs/targets int32 [B/P, T]."""
        return self.windows.take(self.indices(n))

    def iterate(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """batch(start), batch(start + 1), ... forever (resume by passing the next step)."""
        n = start
        while True:
            yield self.batch(n)
            n += 1


def num_eval_batches(windows: Windows, batch_size: int, max_batches: int = 0) -> int:
    """ceil(W / B), capped at `max_batches` when that is > 0."""
    n = -(-len(windows) // batch_size)
    return min(n, max_batches) if max_batches > 0 else n


def eval_batches(windows: Windows, batch_size: int, max_batches: int = 0,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every val window once, in order, in fixed-shape batches (optionally the first N).

    Yields {"inputs": int32 [B/P, T], "targets": int32 [B/P, T], "mask": float32 [B/P, T]}.
    The final partial batch is padded with copies of window 0 whose `mask` is 0, so
    `sum(mask * token_loss) / sum(mask)` over all batches (and processes) is the exact mean
    loss over the val tokens. Sharding across processes as in `BatchSampler`.
    """
    local = _check_sharding(batch_size, process_index, process_count)
    w = len(windows)
    t = windows.context_length
    for n in range(num_eval_batches(windows, batch_size, max_batches)):
        lo = n * batch_size + process_index * local
        pos = np.arange(lo, lo + local, dtype=np.int64)
        real = pos < w
        out = windows.take(np.where(real, pos, 0))
        out["mask"] = np.broadcast_to(real[:, None], (local, t)).astype(np.float32)
        yield out
