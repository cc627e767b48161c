"""Verifiable tasks: problems with a known final answer, a strict answer extractor, a reward.

    task = get_task("arithmetic")                  # or "arithmetic:digits=3,operands=3,ops=+-*"
    problems = task.split("rl", seed=0)            # [Problem(question, answer, solution), ...]
    task.reward(completion_text, problems[0])      # 1.0 if the extracted final answer is right
    sft_splits("arithmetic", seed=0)               # {"train", "val", "test"}: Alpaca records

A task spec is a name plus optional `key=value` options after a colon. Two tasks:

* `arithmetic` (bundled, synthetic, seeded): integer problems "What is 7 + 8 - 2?" of
  `operands` numbers with `digits` digits each and operators from `ops` (`+ - *`; `*` binds
  first). The worked solution reduces one operation a line and ends in the final answer:
  "7 + 8 = 15\\n15 - 2 = 13\\nAnswer: 13". Options: digits (1), operands (3), ops (+-),
  style (chain; or column: digit-by-digit addition with carries, ops=+ only:
  "6 + 6 = 12\\n3 + 2 + 1 = 6\\nAnswer: 62"), and split sizes sft (5000), val (200),
  eval (500), rl (0); 0 = the whole split. The default space holds 4,000 problems (about
  1,750 SFT / 200 val / 400 eval / 1,600 RL): a 4-layer GPT trained from scratch on the SFT
  split reaches roughly 20-60% held-out accuracy in a few hundred steps, leaving RL room
  (2-digit chain operands need far longer to learn from scratch).
* `gsm8k`: JSONL or parquet records {question, answer} whose answer ends "#### N" (default: the bundled
  `gsm8k-test`; option `path=FILE`, or GRPO's `--data`). The SFT target is the answer with
  GSM8K's calculator annotations `<<48/2=24>>` removed.

Splits are disjoint whatever the seed: each problem goes to a split by a stable hash of its
question (crc32), so an SFT run with one seed never trains on another run's RL or eval
problems; the seed only picks which problems of each split are used, and their order.

Arithmetic also has verifiable *process* rewards (`ArithmeticTask.step_rewards`: one per
worked line, exact match with the reference line, then the outcome), used by GRPO's
process supervision (`grpo.supervision`); gsm8k has the outcome reward only.

Two verifiers (task option `verifier`): `strict`, arithmetic's default (its published figures
and its process rewards use it), and `math`, gsm8k's default (`jaxgpt.rl.math_answers`: the
final answer after `####`, in `\\boxed{}` or after "the answer is", normalised and compared
for equivalence, with sympy for symbolic answers). A gsm8k reference must have a final
answer the task's verifier reads, or the file is refused.

The strict verifier (`extract_answer`): the completion must contain the task's
marker ("Answer:" / "####") exactly once, followed on the same line by one number and
nothing else: an optional minus sign, digits with optional comma thousands grouping
("1,234"; "1,23" is not a number) and an optional decimal part. Two markers (even with the
same number), a trailing word ("57 apples"), a trailing period, a "$" or no marker at all
give no answer (reward 0). Answers compare as exact decimals ("1,234" == "1234.0").
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

import numpy as np

from jaxgpt.errors import UserError

SPLITS = ("sft", "val", "rl", "eval")
NUMBER = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")  # ASCII digits only
CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class Problem:
    """One verifiable problem: the question (the Alpaca instruction), the canonical final
    answer (`canonical_number`), and a worked solution ending in the answer (SFT target)."""

    question: str
    answer: str
    solution: str


# ---------------------------------------------------------------------------------------
# Answers


def canonical_number(text: str) -> str | None:
    """"1,234" -> "1234", "-0.50" -> "-0.5", "57.0" -> "57"; None unless `text` is exactly a
    number as NUMBER defines it."""
    text = text.strip()
    if not NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    out = format(value.normalize(), "f")
    return out


def extract_answer(text: str, marker: str) -> str | None:
    """The canonical final answer in `text`, or None (see the module docstring for the rules)."""
    if text.count(marker) != 1:
        return None
    line = text.split(marker, 1)[1].split("\n", 1)[0]
    return canonical_number(line)


def score(text: str, answer: str, marker: str) -> float:
    """1.0 if `text`'s final answer equals `answer` (canonical), else 0.0."""
    return 1.0 if extract_answer(text, marker) == answer else 0.0


# ---------------------------------------------------------------------------------------
# Splits by hash


def split_of(question: str, buckets: dict[str, range], modulus: int) -> str:
    """The split a question belongs to: crc32 of its UTF-8 text modulo `modulus`."""
    h = zlib.crc32(question.encode("utf-8")) % modulus
    for name, r in buckets.items():
        if h in r:
            return name
    raise AssertionError(h)


def _seeded_order(n: int, seed: int, split: str) -> np.ndarray:
    """A permutation of range(n) from (seed, split): the problems a seed uses, in its order."""
    return np.random.default_rng([seed, SPLITS.index(split)]).permutation(n)


# ---------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class ArithmeticTask:
    """Synthetic integer arithmetic (see the module docstring)."""

    digits: int = 1
    operands: int = 3
    ops: str = "+-"
    style: str = "chain"  # chain: one operation a line | column: digit columns with carries ("+" only)
    sft: int = 5000
    val: int = 200
    eval: int = 500
    rl: int = 0
    verifier: str = "strict"  # strict (one number after "Answer:") | math (jaxgpt.rl.math_answers)
    name: str = "arithmetic"
    marker: str = "Answer:"

    # crc32 % 20: 10% eval, 5% val, 45% sft, 40% rl
    BUCKETS = {"eval": range(0, 2), "val": range(2, 3), "sft": range(3, 12), "rl": range(12, 20)}
    ENUMERATE_LIMIT = 300_000  # problem spaces up to this size are listed in full

    def __post_init__(self):
        if not 1 <= self.digits <= 6:
            raise UserError(f"arithmetic digits must be 1..6, got {self.digits}")
        if not 2 <= self.operands <= 6:
            raise UserError(f"arithmetic operands must be 2..6, got {self.operands}")
        if not self.ops or set(self.ops) - set("+-*") or len(set(self.ops)) != len(self.ops):
            raise UserError(f"arithmetic ops must be distinct characters of '+-*', got {self.ops!r}")
        if self.style not in ("chain", "column"):
            raise UserError(f"arithmetic style must be chain or column, got {self.style!r}")
        if self.style == "column" and self.ops != "+":
            raise UserError(f"arithmetic style=column adds only: set ops=+ (got {self.ops!r})")
        for name in ("sft", "val", "eval", "rl"):
            if getattr(self, name) < 0:
                raise UserError(f"arithmetic {name} size must be >= 0, got {getattr(self, name)}")
        _check_verifier(self)

    def _range(self) -> tuple[int, int]:
        return (0, 9) if self.digits == 1 else (10 ** (self.digits - 1), 10 ** self.digits - 1)

    def space_size(self) -> int:
        lo, hi = self._range()
        return (hi - lo + 1) ** self.operands * len(self.ops) ** (self.operands - 1)

    def make_problem(self, numbers, ops) -> Problem:
        """The question, answer and worked solution of `n0 o0 n1 o1 n2 ...` (`*` first,
        then left to right)."""
        expr = " ".join(itertools.chain.from_iterable(zip(map(str, numbers), ops))) + f" {numbers[-1]}"
        if self.style == "column":
            return self._column_problem(numbers, expr)
        nums, ops_ = list(numbers), list(ops)
        lines = []
        while ops_:
            i = ops_.index("*") if "*" in ops_ else 0
            a, b, op = nums[i], nums[i + 1], ops_[i]
            value = a * b if op == "*" else a + b if op == "+" else a - b
            lines.append(f"{a} {op} {b} = {value}")
            nums[i:i + 2] = [value]
            del ops_[i]
        answer = str(nums[0])
        return Problem(f"What is {expr}?", answer, "\n".join(lines) + f"\n{self.marker} {answer}")

    def _column_problem(self, numbers, expr: str) -> Problem:
        """Column addition: one line per digit column, ones first, each adding that column's
        digits and the carry in ("+ 0" when there is none): "7 + 8 = 15\\n4 + 3 + 1 = 8".
        Every line is a sum of single digits, so the model learns a small table and a
        procedure rather than one fact per pair of multi-digit tokens."""
        digits = [str(n).rjust(self.digits, "0")[::-1] for n in numbers]
        lines, carry = [], None
        for col in range(self.digits):
            terms = [d[col] for d in digits] + ([] if carry is None else [str(carry)])
            total = sum(int(t) for t in terms)
            lines.append(" + ".join(terms) + f" = {total}")
            carry = total // 10
        answer = str(sum(numbers))
        return Problem(f"What is {expr}?", answer, "\n".join(lines) + f"\n{self.marker} {answer}")

    def _pools(self, quotas: dict[str, int], seed: int) -> dict[str, list[Problem]]:
        lo, hi = self._range()
        k = self.operands
        if self.space_size() <= self.ENUMERATE_LIMIT:
            pools: dict[str, list[Problem]] = {s: [] for s in SPLITS}
            for numbers in itertools.product(range(lo, hi + 1), repeat=k):
                for ops in itertools.product(self.ops, repeat=k - 1):
                    p = self.make_problem(numbers, ops)
                    pools[split_of(p.question, self.BUCKETS, 20)].append(p)
            return {s: [pool[i] for i in _seeded_order(len(pool), seed, s)][: quotas[s] or None]
                    for s, pool in pools.items()}
        # A large space: draw problems at random (seeded) until every split has its quota.
        # (The RL pool is then capped at 20,000 problems when rl = 0.)
        quotas = {s: q or 20_000 for s, q in quotas.items()}
        rng = np.random.default_rng([seed, 1234])
        pools, seen = {s: [] for s in SPLITS}, set()
        while any(len(pools[s]) < quotas[s] for s in SPLITS):
            numbers = rng.integers(lo, hi + 1, size=k).tolist()
            ops = [self.ops[i] for i in rng.integers(0, len(self.ops), size=k - 1)]
            p = self.make_problem(numbers, ops)
            split = split_of(p.question, self.BUCKETS, 20)
            if p.question not in seen and len(pools[split]) < quotas[split]:
                seen.add(p.question)
                pools[split].append(p)
        return pools

    def split(self, split: str, seed: int = 0) -> list[Problem]:
        """The problems of `split` (sft | val | rl | eval) that `seed` picks."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        quotas = {"sft": self.sft, "val": self.val, "eval": self.eval, "rl": self.rl}
        # Every split is drawn together so the sampled-space path is seed-consistent.
        return self._pools(quotas, seed)[split]

    def extract(self, completion: str) -> str | None:
        return _extract(self, completion)

    def reward(self, completion: str, problem: Problem) -> float:
        return _reward(self, completion, problem)

    def step_rewards(self, completion: str, problem: Problem) -> list[float]:
        """Verifiable process rewards, one per solution line: worked line i scores 1 when it is
        exactly the reference's line i (right operands, right result), the last entry is the
        outcome `reward`. A wrong step fails every later step too (their operands differ), so
        a solution is never credited for steps that merely happen to be true equations."""
        lines = [line.strip() for line in completion.split("\n")]
        reference = problem.solution.split("\n")[:-1]
        steps = [1.0 if i < len(lines) and lines[i] == ref else 0.0 for i, ref in enumerate(reference)]
        return steps + [self.reward(completion, problem)]


@dataclass(frozen=True)
class Gsm8kTask:
    """GSM8K-style word problems from JSONL {question, answer "... #### N"}."""

    path: str = "gsm8k-test"
    question_field: str = "question"
    answer_field: str = "answer"
    verifier: str = "math"  # math (jaxgpt.rl.math_answers: ####, \\boxed{}, "the answer is", sympy) | strict
    name: str = "gsm8k"
    marker: str = "####"

    def __post_init__(self):
        _check_verifier(self)

    # crc32 % 10: 10% eval, 10% val, 40% sft, 40% rl
    BUCKETS = {"eval": range(0, 1), "val": range(1, 2), "sft": range(2, 6), "rl": range(6, 10)}

    def problems(self) -> list[Problem]:
        from jaxgpt.data.records import read_records

        rows = read_records(self.path, {"question": self.question_field, "answer": self.answer_field})
        out = []
        for i, row in enumerate(rows, 1):
            answer = _reference(self, row["answer"])
            if answer is None:
                what = (f"does not end in exactly one '{self.marker} NUMBER' line" if self.verifier == "strict" else
                        f"has no final answer ('{self.marker} N', \\boxed{{...}} or 'the answer is ...')")
                raise UserError(f"{self.path} record {i}: the answer field {what}: {row['answer'][-60:]!r}")
            solution = CALCULATOR.sub("", row["answer"]).strip()
            out.append(Problem(row["question"].strip(), answer, solution))
        return out

    def split(self, split: str, seed: int = 0) -> list[Problem]:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        pool = [p for p in self.problems() if split_of(p.question, self.BUCKETS, 10) == split]
        return [pool[i] for i in _seeded_order(len(pool), seed, split)]

    def extract(self, completion: str) -> str | None:
        return _extract(self, completion)

    def reward(self, completion: str, problem: Problem) -> float:
        return _reward(self, completion, problem)


VERIFIERS = ("strict", "math")


def _check_verifier(task) -> None:
    if task.verifier not in VERIFIERS:
        raise UserError(f"{task.name} verifier must be one of {', '.join(VERIFIERS)}, got {task.verifier!r}")


def _reference(task, text: str) -> str | None:
    """A reference solution's canonical final answer under the task's verifier."""
    if task.verifier == "strict":
        return extract_answer(text, task.marker)
    from jaxgpt.rl.math_answers import canonical, extract_final

    return canonical(extract_final(text))


def _extract(task, completion: str) -> str | None:
    """The completion's final answer (normalised), or None: what format_rate counts."""
    if task.verifier == "strict":
        return extract_answer(completion, task.marker)
    from jaxgpt.rl.math_answers import extract_final, normalize

    return normalize(extract_final(completion))


def _reward(task, completion: str, problem: Problem) -> float:
    if task.verifier == "strict":
        return score(completion, problem.answer, task.marker)
    from jaxgpt.rl.math_answers import is_correct

    return 1.0 if is_correct(completion, problem.answer) else 0.0


TASKS: dict[str, Callable] = {"arithmetic": ArithmeticTask, "gsm8k": Gsm8kTask}


def _option_value(cls, key: str, raw: str, spec: str):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("name", "marker")}
    if key not in fields:
        raise UserError(f"task {spec!r}: unknown option {key!r}; options: {', '.join(fields)}")
    if fields[key].type in ("int", int):
        try:
            return int(raw)
        except ValueError:
            raise UserError(f"task {spec!r}: option {key} must be an integer, got {raw!r}") from None
    return raw


def get_task(spec: str, path: str = ""):
    """The task of `spec` ("NAME" or "NAME:key=value,key=value"); `path` (GRPO's --data)
    sets the data file of tasks that read one."""
    name, _, options = spec.strip().partition(":")
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    kwargs = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise UserError(f"task {spec!r}: options are key=value, got {item!r}")
        kwargs[key.strip()] = _option_value(cls, key.strip(), raw.strip(), spec)
    if path:
        if "path" not in {f.name for f in dataclasses.fields(cls)}:
            raise UserError(f"task {name} is generated, it reads no data file; drop --data / data.path")
        kwargs["path"] = path
    return cls(**kwargs)


def sft_splits(task: str, seed: int) -> dict[str, list[dict[str, str]]]:
    """Supervised splits of a task for `finetune.py instruct --task NAME`: `train` (the SFT
    split), `val`, and `test` (the held-out eval split GRPO also scores), as Alpaca records
    `{"instruction": question, "input": "", "output": worked solution}`. The RL split is
    never included. UserError for an unknown task."""
    t = get_task(task)
    record = lambda p: {"instruction": p.question, "input": "", "output": p.solution}
    return {out: [record(p) for p in t.split(split, seed)]
            for out, split in (("train", "sft"), ("val", "val"), ("test", "eval"))}


__all__ = ["ArithmeticTask", "Gsm8kTask", "Problem", "canonical_number", "extract_answer", "get_task",
           "score", "sft_splits", "split_of"]
