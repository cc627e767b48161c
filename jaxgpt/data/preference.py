"""Preference pairs -> token batches: (prompt, chosen, rejected) in the instruction format.

Used by the reward model (`finetune.py reward`) and DPO (`finetune.py dpo`). Each record
has an instruction, an optional input, a chosen and a rejected response (field names are
config keys: `data.instruction_field`, `data.input_field`, `data.chosen_field`,
`data.rejected_field`; read by `jaxgpt.data.records.read_records`, so a bundled name, a
.json/.jsonl(.gz)/.parquet file or tfds:NAME). Default: the bundled `preference-data` (Raschka ch. 7
DPO notebook: the 1,100 instructions with a polite `chosen` and an impolite `rejected` reply).

Pairs may be conversational (TRL's layouts, e.g. UltraFeedback's): chosen and rejected are
conversations that end with the two answers, the prompt the messages before them
(`jaxgpt.data.conversations.preference_pair`), rendered by the model's chat template.

A sequence is `prompt + response + eos`, the prompt in the model's format
(`jaxgpt.text.prompts`: its chat template, else Alpaca; the same format instruction tuning
trains on), prompt and response tokenized separately so the boundary is exact. Its *response
mask* is 1 on the response tokens (the end-of-text included) and 0 on the prompt and the
padding: what `jaxgpt.train.losses.sequence_logprobs` scores.

Sequences hold at most `max_length` tokens (`data.max_length`, 0 = the model's context). A
prompt that leaves no room for a response is an error (naming the record); responses that do
not fit are truncated (their end-of-text is then cut off), and the number truncated is
reported by `describe()` and in metrics.json.

Split: a seeded shuffle (`data.seed`), then as the book: train = int(0.85 n), test =
int(0.1 n), val = the rest (935 / 110 / 55 of 1,100; fractions configurable). Batches are
right-padded with <|endoftext|> to a multiple of `data.bucket` tokens (so only a few shapes
compile), and training batches are drawn length-sorted within seeded chunks of
`SORT_CHUNK` batches, so little compute goes to padding. Batch `n` is a pure function of
`(data.seed, n)`: a resumed run sees the data it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from jaxgpt.data.conversations import preference_pair, record_prompt
from jaxgpt.data.instruct import epoch_batches
from jaxgpt.data.records import check_split_fractions, read_records
from jaxgpt.errors import UserError
from jaxgpt.text.prompts import prompt_format
from jaxgpt.text.tokenizer import Tokenizer, gpt2_tokenizer

SPLITS = ("train", "val", "test")
SORT_CHUNK = 8  # training batches per length-sorted chunk
TOKEN_KEYS = ("chosen", "rejected", "chosen_mask", "rejected_mask")


@dataclass(frozen=True)
class PreferenceDataConfig:
    """`data` section of the reward and DPO tasks."""

    path: str = "preference-data"  # bundled name | .json/.jsonl(.gz)/.parquet file | tfds:NAME[:SPLIT]
    instruction_field: str = "instruction"
    input_field: str = "input"  # optional in each record; "" = records have no input
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    seed: int = 123  # the shuffle before splitting, and the order of training batches
    max_length: int = 0  # tokens per sequence (prompt + response + end-of-text); 0 = the model's context
    bucket: int = 32  # batches are padded to a multiple of this many tokens; 0 = always max_length


def validate_data(cfg: PreferenceDataConfig, context_length: int) -> None:
    if not cfg.path or not cfg.path.strip():
        raise UserError("data.path is empty; give a bundled data set name, a .json/.jsonl/.parquet file or tfds:NAME")
    check_split_fractions(cfg.val_fraction, cfg.test_fraction)
    if cfg.max_length < 0 or cfg.bucket < 0:
        raise UserError(f"data.max_length and data.bucket must be >= 0, got {cfg.max_length} and {cfg.bucket}")
    if cfg.max_length > context_length:
        raise UserError(f"data.max_length={cfg.max_length} is longer than the model's context "
                        f"(model.context_length={context_length})")
    for role in ("instruction", "chosen", "rejected"):
        if not getattr(cfg, f"{role}_field"):
            raise UserError(f"data.{role}_field must be non-empty")


def read_pairs(cfg: PreferenceDataConfig, *, tfds_data_dir: str | None = None) -> list[dict]:
    """Every record as `{"instruction", "input", "chosen", "rejected"}` strings; a conversational
    pair (chosen and rejected conversations) also has `messages`, the conversation its answers
    continue (`jaxgpt.data.conversations.preference_pair`)."""
    answers = {"chosen": cfg.chosen_field, "rejected": cfg.rejected_field}
    required = {"instruction": cfg.instruction_field, **answers}
    optional = {"input": cfg.input_field} if cfg.input_field else {}
    rows = read_records(cfg.path, required, optional, instead=answers, tfds_data_dir=tfds_data_dir)
    for i, row in enumerate(rows):
        row.setdefault("input", "")
        if any(isinstance(row[k], list) for k in answers):
            rows[i] = preference_pair(row, f"{cfg.path} record {i + 1}")
    return rows


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Record indices of each split: a seeded permutation, then train | test | val in that
    order with int(n * train_fraction) and int(n * test_fraction) records (as the book)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(n * round(1.0 - val_fraction - test_fraction, 9))
    n_test = int(n * test_fraction)
    return {"train": perm[:n_train], "test": perm[n_train:n_train + n_test], "val": perm[n_train + n_test:]}


def response_ids(response: str, tokenizer: Tokenizer | None = None) -> list[int]:
    """Token ids of a response as trained on: the text, then the token that ends an answer
    (`Tokenizer.answer_end_id`: eos, or the chat template's end of an answer)."""
    tokenizer = tokenizer or gpt2_tokenizer()
    return tokenizer.encode(response) + [tokenizer.answer_end_id]


def encode_example(instruction: str, input: str, response: str,
                   tokenizer: Tokenizer | None = None) -> tuple[list[int], list[int]]:
    """`(prompt ids, response ids)` of one example (the response ends with end-of-text);
    the reward CLI and RL rollouts score exactly these sequences."""
    tokenizer = tokenizer or gpt2_tokenizer()
    return tokenizer.encode(prompt_format(tokenizer).prompt(instruction, input)), response_ids(response, tokenizer)


@dataclass
class PreferenceSplit:
    """One split, padded to `max_length`. `columns` holds per-pair arrays (`[n]` or `[n, T]`):

    chosen, rejected        int32 [n, T]  prompt + response + EOT, right-padded with EOT
    chosen_mask, rejected_mask  float32 [n, T]  1 on response tokens
    chosen_lengths, rejected_lengths  int32 [n]  real tokens per row (1..T)
    prompt_lengths          int32 [n]
    record                  int32 [n]  index of the source record

    Tasks may add columns (DPO adds the reference log-probs `ref_chosen`, `ref_rejected`)."""

    columns: dict[str, np.ndarray]
    records: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.columns["record"])

    def pair_lengths(self) -> np.ndarray:
        return np.maximum(self.columns["chosen_lengths"], self.columns["rejected_lengths"])

    def response_lengths(self) -> np.ndarray:
        """Response tokens (end-of-text included) of the longer response of each pair."""
        c = self.columns
        return np.maximum(c["chosen_lengths"], c["rejected_lengths"]) - c["prompt_lengths"]

    def take(self, idx, length: int, window: int) -> dict[str, np.ndarray]:
        """Rows `idx`, token arrays cropped to `length` columns, plus `positions [b, window]`
        int32: consecutive positions from just before each pair's responses (the prompt's
        last token, which predicts the first response token) past their ends, shifted left
        where they would run past `length`: the only positions whose LM logits score the
        responses (the model's `head_positions`; the window never starts inside a response)."""
        out = {k: (v[idx, :length] if k in TOKEN_KEYS else v[idx]) for k, v in self.columns.items()}
        start = np.minimum(out["prompt_lengths"] - 1, length - window)
        positions = (start[:, None] + np.arange(window)[None, :]).astype(np.int32)
        out["positions"] = positions
        return out


@dataclass
class PreferenceData:
    source: str
    max_length: int
    bucket: int
    splits: dict[str, PreferenceSplit]
    seed: int
    num_read: int
    truncated: int  # responses (chosen or rejected) cut to fit max_length

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.splits["train"]) // batch_size

    def _rounded(self, n: int) -> int:
        return min(-(-n // self.bucket) * self.bucket if self.bucket else self.max_length, self.max_length)

    def batch(self, split: str, idx) -> dict[str, np.ndarray]:
        """Rows `idx` of `split` padded to the bucket above their longest sequence, with a
        response window (see `PreferenceSplit.take`) of the bucket above their longest
        response + 1 (the last prompt position predicts the first response token)."""
        data = self.splits[split]
        length = self._rounded(int(data.pair_lengths()[idx].max()))
        window = min(self._rounded(int(data.response_lengths()[idx].max()) + 1), length)
        return data.take(idx, length, window)

    def epoch_batches(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """The training batches of `epoch` (row indices): a seeded permutation, sorted by
        length within chunks of SORT_CHUNK batches, the batch order shuffled again; the
        incomplete last batch is dropped (as the book's loader)."""
        return epoch_batches(self.splits["train"].pair_lengths(), batch_size, SORT_CHUNK, self.seed, epoch,
                             drop_last=True)

    def train_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Batch number `step`, a pure function of (data.seed, step)."""
        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        return self.batch("train", self.epoch_batches(epoch, batch_size)[i])

    def eval_batches(self, split: str, batch_size: int, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Every pair of `split` once, in batches of `batch_size` sorted by length (less
        padding); `row` `[b]` says which pairs (indices into the split). The last batch is
        padded with weight-0 copies of its first row so sums over `weight` are exact.

        max_batches > 0: only that many of these batches, evenly spaced over the sorted order
        (every length range is represented, and each batch is exactly as in the full pass, so
        values computed per pair in a full pass, e.g. DPO's reference log-probs, are bitwise
        those of any capped pass at the same params)."""
        data = self.splits[split]
        rows = np.argsort(data.pair_lengths(), kind="stable")
        starts = np.arange(0, len(rows), batch_size)
        if max_batches and len(starts) > max_batches:
            starts = starts[np.unique(np.linspace(0, len(starts) - 1, max_batches).round().astype(int))]
        for s in starts:
            idx = rows[s:s + batch_size]
            pad = batch_size - len(idx)
            weight = np.ones(batch_size, np.float32)
            if pad:
                weight[len(idx):] = 0.0
                idx = np.concatenate([idx, np.full(pad, idx[0])])
            batch = self.batch(split, idx)
            batch["weight"], batch["row"] = weight, idx.astype(np.int32)
            yield batch

    def describe(self) -> str:
        sizes = " / ".join(f"{len(self.splits[s])} {s}" for s in SPLITS)
        lengths = np.concatenate([self.splits[s].pair_lengths() for s in SPLITS if len(self.splits[s])])
        return (f"{self.source}: {self.num_read} pairs, {sizes}; sequences up to {self.max_length} tokens "
                f"(longest {int(lengths.max())}, mean {lengths.mean():.0f}), {self.truncated} responses truncated")


def _pad_rows(rows: list[list[int]], length: int, dtype, pad_id: int = 0) -> np.ndarray:
    out = np.full((len(rows), length), pad_id, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def encode_pairs(rows: list[dict[str, str]], max_length: int, source: str,
                 tokenizer: Tokenizer | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Token columns (see `PreferenceSplit`) of `rows`, and how many responses were truncated."""
    tokenizer = tokenizer or gpt2_tokenizer()
    prompts = tokenizer.encode_batch([record_prompt({"where": f"{source} record {i + 1}", **r}, tokenizer)
                                      for i, r in enumerate(rows)])
    responses = {k: [ids + [tokenizer.answer_end_id] for ids in tokenizer.encode_batch([r[k] for r in rows])]
                 for k in ("chosen", "rejected")}
    truncated = 0
    cols: dict[str, np.ndarray] = {"prompt_lengths": np.array([len(p) for p in prompts], np.int32)}
    for i, p in enumerate(prompts):
        if len(p) >= max_length:
            raise UserError(f"{source} record {i + 1}: the prompt is {len(p)} tokens, but sequences hold "
                            f"{max_length} (data.max_length, at most the model's context) and need room for a "
                            "response; shorten the instruction/input or use a model with a longer context")
    for k in ("chosen", "rejected"):
        seqs, masks = [], []
        for p, r in zip(prompts, responses[k]):
            if len(p) + len(r) > max_length:
                truncated += 1
                r = r[: max_length - len(p)]
            seqs.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
        cols[k] = _pad_rows(seqs, max_length, np.int32, tokenizer.pad_id)
        cols[f"{k}_mask"] = _pad_rows(masks, max_length, np.float32)
        cols[f"{k}_lengths"] = np.array([len(s) for s in seqs], np.int32)
    return cols, truncated


def load_preference(cfg: PreferenceDataConfig, context_length: int, *, tfds_data_dir: str | None = None,
                    tokenizer: Tokenizer | None = None) -> PreferenceData:
    """Read, shuffle, split and tokenize `cfg.path` (see the module docstring)."""
    validate_data(cfg, context_length)
    rows = read_pairs(cfg, tfds_data_dir=tfds_data_dir)
    max_length = cfg.max_length or context_length
    cols, truncated = encode_pairs(rows, max_length, cfg.path, tokenizer)
    cols["record"] = np.arange(len(rows), dtype=np.int32)
    parts = split_indices(len(rows), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    if len(parts["train"]) < 1:
        raise UserError(f"{cfg.path}: only {len(rows)} records; too few to split into train/val/test")
    splits = {s: PreferenceSplit({k: v[parts[s]] for k, v in cols.items()}, [rows[i] for i in parts[s]])
              for s in SPLITS}
    return PreferenceData(cfg.path, max_length, cfg.bucket, splits, cfg.seed, len(rows), truncated)


__all__ = ["PreferenceData", "PreferenceDataConfig", "PreferenceSplit", "encode_example", "encode_pairs",
           "load_preference", "read_pairs", "response_ids", "split_indices", "validate_data"]
