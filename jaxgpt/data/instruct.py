"""Instruction data: records -> token ids -> masked, length-bucketed next-token batches.

    data = load_instruct(cfg.data, max_length=cfg.model.context_length)
    data.train_batch(step, batch_size)   # {"inputs", "targets"} int32 [B, L], "mask" float32 [B, L]
    for b in data.eval_batches("val", batch_size): ...

Records are `{"instruction", "input", "output"}` strings (roles; the file's field names are
`data.instruction_field` / `data.input_field` / `data.output_field`), or conversations: a
`messages` list of `{"role", "content"}` (`data.messages_field`; ShareGPT's from/value too),
read by
`jaxgpt.data.records.read_records` from a bundled name (default `instruction-data`, the book's
1,100 records), a .json/.jsonl(.gz)/.parquet file or `tfds:NAME`; or, with `data.task`, the SFT splits
of a verifiable task, which the caller passes in (`task_splits`: `jaxgpt.tasks.instruct` gets
them from `jaxgpt.rl.tasks.sft_splits`; the data layer does not import the RL package, which
sits above it). File records are shuffled with
`data.seed` and split as Raschka ch. 7: train = int(0.85 n), test = int(0.1 n), val = the rest
(935 / 110 / 55 for 1,100; fractions `data.test_fraction`, `data.val_fraction`).

An example is `prompt + response + eos` (the prompt in the model's format, `jaxgpt.text.prompts`:
its chat template, else Alpaca; GPT-2's eos is `<|endoftext|>`; prompt
and response tokenized separately so the boundary is exact), cut to `max_length + 1` tokens.
Its row: `inputs = seq[:-1]`, `targets = seq[1:]`, right-padded with `<|endoftext|>`;
`mask` is 1 on scored targets: the response tokens and the first `<|endoftext|>` (the model
must learn to stop), plus the prompt tokens when `data.mask_prompt` is false; 0 on padding.
Padding sits right of every real token, so causal attention needs no attention mask.

A conversation is its chat template's rendering, and `mask` is 1 on the assistant's turns
(`jaxgpt.data.conversations`: each answer and the token that ends it), so every answer of a
multi-turn conversation trains; its test prompt is everything before the last answer that
starts inside the context, and that answer is the reference. A model without a chat template
(GPT-2) cannot take conversations: a one-line error says so.

Batches are length-bucketed: each epoch is a seeded permutation cut into chunks of
`data.sort_chunk` batches, sorted by length inside a chunk, cut into batches, and the
batches shuffled; a batch is padded to its longest row rounded up to a multiple of
`data.bucket` (capped at max_length), so a handful of shapes compile and little compute
goes to padding. Every training record appears exactly once per epoch: the last batch is
filled with mask-0 rows. Batch `step` is a pure function of (data.seed, step), so resuming
replays the stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from jaxgpt.data.conversations import EncodedConversation, as_messages, encode_conversations
from jaxgpt.data.records import check_split_fractions, read_records
from jaxgpt.errors import UserError
from jaxgpt.text.prompts import prompt_format
from jaxgpt.text.tokenizer import Tokenizer, gpt2_tokenizer

SPLITS = ("train", "val", "test")
ROLES = ("instruction", "input", "output")


@dataclass(frozen=True)
class InstructDataConfig:
    """The `data` section of instruction fine-tuning."""

    path: str = "instruction-data"  # bundled name | .json/.jsonl(.gz)/.parquet file | tfds:NAME[:SPLIT]
    task: str = ""  # a verifiable task's SFT splits (jaxgpt.rl.tasks.sft_splits) instead of path
    instruction_field: str = "instruction"
    input_field: str = "input"  # optional in the records: missing reads as ""
    output_field: str = "output"
    messages_field: str = "messages"  # a record holding this field is a conversation ([{role, content}])
    test_fraction: float = 0.1  # int(n * test) records; train gets int(n * (1 - test - val))
    val_fraction: float = 0.05  # val gets the rest
    seed: int = 123  # shuffle before splitting, and the epoch order of training batches
    max_length: int = 0  # input tokens per example (longer ones are truncated); 0 = the model's context
    mask_prompt: bool = True  # score only the response (and its end-of-text) tokens
    bucket: int = 16  # batches are padded to a multiple of this many tokens
    sort_chunk: int = 16  # sort by length within seeded chunks of this many batches


def validate_data(cfg: InstructDataConfig, context_length: int) -> None:
    if not cfg.task and not cfg.path.strip():
        raise UserError("data.path is empty; give a bundled data set name, a .json/.jsonl/.parquet file or tfds:NAME")
    check_split_fractions(cfg.val_fraction, cfg.test_fraction)
    if cfg.max_length < 0 or cfg.max_length > context_length:
        raise UserError(f"data.max_length must be in [0, model.context_length={context_length}] "
                        f"(0 = the context), got {cfg.max_length}")
    if cfg.bucket < 1 or cfg.sort_chunk < 1:
        raise UserError(f"data.bucket and data.sort_chunk must be >= 1, got {cfg.bucket}, {cfg.sort_chunk}")
    for role in (*ROLES, "messages"):
        if not getattr(cfg, f"{role}_field"):
            raise UserError(f"data.{role}_field must be non-empty")


# ---------------------------------------------------------------------------------------
# Records and splits


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) as the book: int(n * train), int(n * test), val = the rest."""
    n_train = int(n * round(1.0 - val_fraction - test_fraction, 9))
    n_test = int(n * test_fraction)
    return n_train, n - n_train - n_test, n_test


def read_splits(cfg: InstructDataConfig, *, task_splits: dict[str, list[dict]] | None = None,
                tfds_data_dir: str | None = None) -> dict[str, list[dict[str, str]]]:
    """`{split: [record]}`: the task's SFT splits `task_splits` (given exactly when `data.task`
    is set), checked, or `data.path` shuffled and split.

    Each record gets `"where"`: how to find it in the source (for error messages)."""
    if bool(cfg.task) != (task_splits is not None):
        raise ValueError(f"task_splits must be given exactly when data.task is set (data.task={cfg.task!r}); "
                         "they are jaxgpt.rl.tasks.sft_splits(data.task, data.seed)")
    if task_splits is not None:
        out = {}
        for split in SPLITS:
            out[split] = []
            for i, rec in enumerate(task_splits.get(split, [])):
                where = f"task {cfg.task!r} {split} record {i + 1}"
                if not all(isinstance(rec.get(k, ""), str) for k in ROLES) or "instruction" not in rec \
                        or "output" not in rec:
                    raise UserError(f"{where}: expected string fields instruction, output (and input)")
                out[split].append({"instruction": rec["instruction"], "input": rec.get("input", ""),
                                   "output": rec["output"], "where": where})
        return out
    rows = read_records(cfg.path, {"instruction": cfg.instruction_field, "output": cfg.output_field},
                        {"input": cfg.input_field}, instead={"messages": cfg.messages_field},
                        tfds_data_dir=tfds_data_dir)
    for i, row in enumerate(rows):
        row["where"] = f"{cfg.path} record {i + 1}"
        if "messages" in row:
            row["messages"] = as_messages(row["messages"], row["where"])
    perm = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_train, n_val, n_test = split_sizes(len(rows), cfg.val_fraction, cfg.test_fraction)
    rows = [rows[i] for i in perm]  # the book's order: train, test, val
    return {"train": rows[:n_train], "test": rows[n_train:n_train + n_test], "val": rows[n_train + n_test:]}


def check_split_sizes(splits: dict[str, list], cfg: InstructDataConfig, batch_size: int) -> None:
    sizes = {s: len(splits[s]) for s in SPLITS}
    source = f"task {cfg.task!r}" if cfg.task else cfg.path
    if sizes["train"] < 1 or sizes["val"] < 1 or (sizes["test"] < 1 and cfg.test_fraction > 0 and not cfg.task):
        raise UserError(f"{source}: too few records to split ({sum(sizes.values())} give train/val/test = "
                        f"{sizes['train']}/{sizes['val']}/{sizes['test']}); each split needs at least one")
    if batch_size > sizes["train"]:
        raise UserError(f"train.batch_size={batch_size} is larger than the training split "
                        f"({sizes['train']} records); lower train.batch_size")


# ---------------------------------------------------------------------------------------
# Tokens


@dataclass
class Encoded:
    """One split, tokenized. seqs[i]: `prompt + response + EOT` ids (a conversation's tokens)
    cut to max_length + 1; prompt_lengths[i]: tokens of the prompt (a conversation: before the
    answer its test prompt asks for); lengths[i] = len(seqs[i]) - 1, the input length;
    scored[i]: bool [len(seqs[i])], the tokens the loss covers (default: from the prompt's end on)."""

    records: list[dict]
    seqs: list[np.ndarray]
    prompt_lengths: np.ndarray  # int32 [n]
    lengths: np.ndarray  # int32 [n], 1..max_length
    pad_id: int = field(default_factory=lambda: gpt2_tokenizer().pad_id)  # fills rows (never scored)
    scored: list[np.ndarray] | None = None

    def __post_init__(self):
        if self.scored is None:
            self.scored = [np.arange(len(s)) >= p for s, p in zip(self.seqs, self.prompt_lengths)]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def prompts(self) -> list[list[int]]:
        return [s[:p].tolist() for s, p in zip(self.seqs, self.prompt_lengths)]


def _too_long(where: str, prompt_tokens: int, max_length: int) -> UserError:
    return UserError(f"{where}: its prompt is {prompt_tokens} tokens, which leaves no room for a response in the "
                     f"context of {max_length} tokens; shorten it or use a model with a longer context "
                     "(model.context_length / data.max_length)")


def _conversation_row(rec: dict, conv: EncodedConversation, max_length: int, tokenizer: Tokenizer
                      ) -> tuple[dict, np.ndarray, np.ndarray, int]:
    """`(record, seq, scored, prompt_length)` of a conversation record cut to `max_length + 1`
    tokens; the record becomes the test prompt's messages and the reference answer."""
    where = rec.get("where", "a record")
    if conv.turns[0][0] >= max_length:
        raise _too_long(where, conv.turns[0][0], max_length)
    j = max(j for j, (start, _) in enumerate(conv.turns) if start < max_length)
    start, end = conv.turns[j]
    answer = conv.ids[start:end].tolist()
    if answer and answer[-1] in tokenizer.special_tokens.values():
        answer = answer[:-1]
    record = {"messages": rec["messages"][:conv.assistant[j]], "output": tokenizer.decode(answer).strip(),
              "where": where}
    return record, conv.ids[:max_length + 1], conv.scored[:max_length + 1], start


def encode_split(records: list[dict], max_length: int, tokenizer: Tokenizer | None = None) -> Encoded:
    """Tokenize records (`tokenizer`: default GPT-2's); a prompt that leaves no room for a
    response token is a UserError."""
    tokenizer = tokenizer or gpt2_tokenizer()
    fmt = prompt_format(tokenizer)
    singles = [r for r in records if "messages" not in r]
    chats = [r for r in records if "messages" in r]
    prompts = iter(tokenizer.encode_batch([fmt.prompt(r["instruction"], r.get("input", "")) for r in singles]))
    responses = iter(tokenizer.encode_batch([r["output"] for r in singles]))
    convs = iter(encode_conversations([r["messages"] for r in chats], tokenizer,
                                      [r.get("where", "a record") for r in chats]))
    out, seqs, scored, prompt_lengths = [], [], [], []
    for rec in records:
        if "messages" in rec:
            rec, seq, mask, p = _conversation_row(rec, next(convs), max_length, tokenizer)
        else:
            p, r = next(prompts), next(responses)
            if len(p) >= max_length:
                raise _too_long(rec.get("where", "a record"), len(p), max_length)
            seq = np.asarray((p + r + [tokenizer.answer_end_id])[: max_length + 1], np.int32)
            p = len(p)
            mask = np.arange(len(seq)) >= p
        out.append(rec)
        seqs.append(seq)
        scored.append(mask)
        prompt_lengths.append(p)
    lengths = np.array([len(s) - 1 for s in seqs], np.int32)
    return Encoded(out, seqs, np.array(prompt_lengths, np.int32), lengths, tokenizer.pad_id, scored)


def bucket_length(longest: int, bucket: int, max_length: int) -> int:
    """`longest` rounded up to a multiple of `bucket`, capped at `max_length`."""
    return min(-(-longest // bucket) * bucket, max_length)


def make_batch(data: Encoded, idx, batch_size: int, length: int, mask_prompt: bool) -> dict[str, np.ndarray]:
    """Rows `idx` of `data` as one batch of `batch_size` rows and `length` tokens.

    inputs / targets `[B, L]` int32 (EOT-padded, targets shifted by one), mask `[B, L]`
    float32: 1 on the response and the first EOT after it, or on a conversation's answers (on
    every target when not `mask_prompt`), 0 on padding; rows beyond `len(idx)` are all padding (mask 0)."""
    inputs = np.full((batch_size, length), data.pad_id, np.int32)
    targets = np.full((batch_size, length), data.pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.float32)
    for row, i in enumerate(idx):
        seq = data.seqs[i][: length + 1]
        n = len(seq) - 1
        inputs[row, :n] = seq[:-1]
        targets[row, :n] = seq[1:]
        # targets[j] = seq[j + 1]: scored where that token is (a response token or the EOT).
        mask[row, :n] = data.scored[i][1:n + 1] if mask_prompt else 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}


# ---------------------------------------------------------------------------------------
# Length-bucketed batching


def epoch_batches(lengths: np.ndarray, batch_size: int, sort_chunk: int, seed: int, epoch: int,
                  drop_last: bool = False) -> list[np.ndarray]:
    """Index arrays of one epoch's batches (see the module docstring); every index once,
    all batches full except possibly one (`drop_last`: the rows past the last full batch of
    the permutation are left out). A pure function of its arguments."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    if drop_last:
        perm = perm[: len(perm) // batch_size * batch_size]
    chunk = batch_size * sort_chunk
    batches = []
    for start in range(0, len(perm), chunk):
        idx = perm[start:start + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_fraction(batches: list[np.ndarray], lengths: np.ndarray, batch_size: int, bucket: int,
                     max_length: int) -> float:
    """Share of the `[B, L]` input positions of `batches` that are padding (fill rows included)."""
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(batch_size * bucket_length(int(lengths[b].max()), bucket, max_length) for b in batches)
    return 1.0 - real / total if total else 0.0


@dataclass
class InstructData:
    source: str
    splits: dict[str, Encoded]
    max_length: int
    mask_prompt: bool
    bucket: int
    sort_chunk: int
    seed: int

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.splits["train"]) / batch_size)

    _epochs: dict = field(default_factory=dict, repr=False)  # (epoch, batch_size) -> batches

    def epoch(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        key = (epoch, batch_size)
        if key not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            self._epochs[key] = epoch_batches(self.splits["train"].lengths, batch_size, self.sort_chunk,
                                              self.seed, epoch)
        return self._epochs[key]

    def batch_length(self, idx) -> int:
        return bucket_length(int(self.splits["train"].lengths[idx].max()), self.bucket, self.max_length)

    def train_indices(self, step: int, batch_size: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        return self.epoch(epoch, batch_size)[i]

    def train_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Batch number `step` (epoch `step // steps_per_epoch`)."""
        idx = self.train_indices(step, batch_size)
        return make_batch(self.splits["train"], idx, batch_size, self.batch_length(idx), self.mask_prompt)

    def real_tokens(self, step: int, batch_size: int) -> int:
        """Non-padding input tokens of batch `step` (for throughput)."""
        return int(self.splits["train"].lengths[self.train_indices(step, batch_size)].sum())

    def padding_stats(self, batch_size: int, epoch: int = 0) -> dict[str, float]:
        """Padding share of one epoch's bucketed batches, against the same records in random
        batches each padded to its own longest row (the book's collate), and the mean
        padded batch length."""
        lengths = self.splits["train"].lengths
        batches = list(self.epoch(epoch, batch_size))
        naive = np.array_split(np.random.default_rng([self.seed, epoch]).permutation(len(lengths)), len(batches))
        padded = [batch_size * self.batch_length(b) for b in batches]
        return {"padding_fraction": padding_fraction(batches, lengths, batch_size, self.bucket, self.max_length),
                "padding_fraction_unbucketed": padding_fraction(naive, lengths, batch_size, 1, self.max_length),
                "mean_batch_tokens": float(np.mean(padded))}

    def eval_batches(self, split: str, batch_size: int, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Every record of `split` once, sorted by length, in bucketed batches of `batch_size`
        rows (the last filled with mask-0 rows, so summed losses and counts are exact)."""
        data = self.splits[split]
        order = np.argsort(data.lengths, kind="stable")
        starts = list(range(0, len(order), batch_size))
        for s in starts[:max_batches] if max_batches else starts:
            idx = order[s:s + batch_size]
            length = bucket_length(int(data.lengths[idx].max()), self.bucket, self.max_length)
            yield make_batch(data, idx, batch_size, length, self.mask_prompt)

    def describe(self) -> str:
        sizes = " / ".join(f"{len(self.splits[s])} {s}" for s in SPLITS)
        return f"{self.source}: {sizes}; max_length {self.max_length} tokens, bucket {self.bucket}"


def load_instruct(cfg: InstructDataConfig, context_length: int, batch_size: int, *,
                  task_splits: dict[str, list[dict]] | None = None,
                  tfds_data_dir: str | None = None, tokenizer: Tokenizer | None = None) -> InstructData:
    """Read, split, check and tokenize the data (see the module docstring); `task_splits`:
    the SFT splits of `data.task` (`jaxgpt.rl.tasks.sft_splits(data.task, data.seed)`),
    given exactly when it is set."""
    validate_data(cfg, context_length)
    splits = read_splits(cfg, task_splits=task_splits, tfds_data_dir=tfds_data_dir)
    check_split_sizes(splits, cfg, batch_size)
    max_length = cfg.max_length or context_length
    encoded = {s: encode_split(splits[s], max_length, tokenizer) for s in SPLITS}
    source = f"task {cfg.task}" if cfg.task else cfg.path
    return InstructData(source, encoded, max_length, cfg.mask_prompt, cfg.bucket, cfg.sort_chunk, cfg.seed)
