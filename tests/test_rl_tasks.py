"""Verifiable tasks: strict answer extraction, the arithmetic generator, disjoint splits,
GSM8K records, sft_splits, bad input."""
from __future__ import annotations

import gzip
import json

import pytest

from jaxgpt.errors import UserError
from jaxgpt.rl.tasks import ArithmeticTask, canonical_number, extract_answer, get_task, score, sft_splits


@pytest.mark.parametrize(
    "text, marker, expected",
    [
        ("12 + 45 = 57\nAnswer: 57", "Answer:", "57"),
        ("Answer:57", "Answer:", "57"),
        ("Answer:   57   \n", "Answer:", "57"),
        ("...\n#### 1,234", "####", "1234"),
        ("#### 12,345,678", "####", "12345678"),
        ("#### 1,23", "####", None),  # not thousands grouping
        ("#### 1234,567", "####", None),
        ("#### ,123", "####", None),
        ("5 - 9 = -4\nAnswer: -4", "Answer:", "-4"),
        ("Answer: - 4", "Answer:", None),
        ("Answer: --4", "Answer:", None),
        ("Answer: +4", "Answer:", None),
        ("#### -0", "####", "0"),
        ("#### 3.50", "####", "3.5"),
        ("#### 57.0", "####", "57"),
        ("#### 0.25", "####", "0.25"),
        ("#### .5", "####", None),
        ("#### 5.", "####", None),
        ("#### 1,234.5", "####", "1234.5"),
        ("Answer: 57 apples", "Answer:", None),  # trailing text on the answer line
        ("Answer: 57.", "Answer:", None),  # trailing period
        ("Answer: $57", "Answer:", None),
        ("Answer: 57\nso that is it", "Answer:", "57"),  # later lines are not the answer
        ("Answer: 5\nAnswer: 6", "Answer:", None),  # multiple answers
        ("Answer: 5\nAnswer: 5", "Answer:", None),  # even when they agree
        ("7 + 8 = 15", "Answer:", None),  # no answer
        ("", "Answer:", None),
        ("Answer:", "Answer:", None),
        ("Answer:\n57", "Answer:", None),  # the number must be on the marker's line
        ("answer: 57", "Answer:", None),  # case matters
        ("#### 57", "Answer:", None),  # the other task's marker
        ("Answer: 57", "####", None),
        ("Answer: 1e3", "Answer:", None),
        ("Answer: ５７", "Answer:", None),  # fullwidth digits are not ASCII digits
    ],
)
def test_extract_answer_is_strict(text, marker, expected):
    assert extract_answer(text, marker) == expected


def test_canonical_numbers_compare_exactly():
    assert canonical_number("1,234") == canonical_number("1234") == canonical_number("1234.000") == "1234"
    assert canonical_number("-0.0") == canonical_number("0") == "0"
    assert canonical_number("100") == "100" and canonical_number("1e2") is None  # normalize() must not give 1E+2
    assert canonical_number("-12.50") == "-12.5"
    assert score("x\nAnswer: 1,000", "1000", "Answer:") == 1.0
    assert score("x\nAnswer: 1,000", "100", "Answer:") == 0.0
    assert score("x\nAnswer: -3", "3", "Answer:") == 0.0


def test_arithmetic_problems_are_correct_and_worked():
    task = get_task("arithmetic:digits=2,operands=4,ops=+-*,eval=50,sft=50,val=10,rl=50")
    assert task.space_size() > ArithmeticTask.ENUMERATE_LIMIT  # the sampled path
    for p in task.split("eval", 3):
        expr = p.question.removeprefix("What is ").removesuffix("?")
        assert int(p.answer) == eval(expr)  # noqa: S307 (digits and + - * only)
        lines = p.solution.split("\n")
        assert len(lines) == 4 and lines[-1] == f"Answer: {p.answer}"
        for line in lines[:-1]:  # each step is itself a correct equation
            left, right = line.split(" = ")
            assert eval(left) == int(right)  # noqa: S307
        assert lines[-2].endswith(f"= {p.answer}")
        assert task.reward(p.solution, p) == 1.0
        assert task.reward(p.solution.replace(f"Answer: {p.answer}", f"Answer: {int(p.answer) + 1}"), p) == 0.0
    # `*` binds first: the worked steps do the product before the sum.
    p = ArithmeticTask().make_problem([2, 3, 4], ["+", "*"])
    assert p.answer == "14" and p.solution == "3 * 4 = 12\n2 + 12 = 14\nAnswer: 14"
    p = ArithmeticTask().make_problem([7, 8, 9], ["-", "-"])
    assert p.answer == "-10" and p.solution == "7 - 8 = -1\n-1 - 9 = -10\nAnswer: -10"


def test_arithmetic_step_rewards_mark_each_worked_line_against_the_reference():
    task = ArithmeticTask()
    p = task.make_problem([7, 8, 2], ["+", "-"])  # 7 + 8 = 15, 15 - 2 = 13
    assert task.step_rewards(p.solution, p) == [1.0, 1.0, 1.0]
    assert task.step_rewards("7 + 8 = 15\n15 - 2 = 12\nAnswer: 12", p) == [1.0, 0.0, 0.0]
    # A slip on line 1 fails line 2 too, even when line 2 is a true equation.
    assert task.step_rewards("7 + 8 = 14\n14 - 2 = 12\nAnswer: 12", p) == [0.0, 0.0, 0.0]
    assert task.step_rewards(" 7 + 8 = 15 \n15 - 2 = 13\nAnswer: 13", p) == [1.0, 1.0, 1.0]  # spaces at ends
    assert task.step_rewards("Answer: 13", p) == [0.0, 0.0, 1.0]  # the right answer without the work
    assert task.step_rewards("", p) == [0.0, 0.0, 0.0]
    column = ArithmeticTask(digits=2, operands=2, ops="+", style="column")
    q = column.make_problem([36, 26], ["+"])
    assert q.solution == "6 + 6 = 12\n3 + 2 + 1 = 6\nAnswer: 62"
    assert column.step_rewards("6 + 6 = 12\n3 + 2 + 0 = 5\nAnswer: 52", q) == [1.0, 0.0, 0.0]
    wide = ArithmeticTask(digits=3, operands=2, ops="+", style="column").make_problem([999, 101], ["+"])
    assert wide.solution == "9 + 1 = 10\n9 + 0 + 1 = 10\n9 + 1 + 1 = 11\nAnswer: 1100"


def test_default_arithmetic_splits_are_disjoint_across_seeds_and_deterministic():
    task = get_task("arithmetic")
    assert task.space_size() == 4000
    splits = {s: task.split(s, 0) for s in ("sft", "val", "rl", "eval")}
    sizes = {s: len(v) for s, v in splits.items()}
    assert sum(sizes.values()) == 4000 and all(n > 150 for n in sizes.values())
    other = {s: {p.question for p in task.split(s, 1)} for s in splits}
    questions = {s: {p.question for p in v} for s, v in splits.items()}
    for a in splits:
        for b in splits:
            if a != b:  # a problem never moves split, whatever the seed
                assert not questions[a] & other[b]
    assert questions["eval"] == other["eval"]  # the whole split (default sizes exceed the pools)
    assert [p.question for p in task.split("rl", 0)] == [p.question for p in splits["rl"]]
    assert [p.question for p in task.split("rl", 1)] != [p.question for p in splits["rl"]]
    capped = get_task("arithmetic:digits=2,operands=2,sft=100,eval=30")
    assert len(capped.split("sft", 0)) == 100 and len(capped.split("eval", 0)) == 30
    assert len({p.question for p in capped.split("sft", 0)}) == 100


def test_sft_splits_records():
    out = sft_splits("arithmetic", 0)
    assert set(out) == {"train", "val", "test"}
    task = get_task("arithmetic")
    assert [r["instruction"] for r in out["test"]] == [p.question for p in task.split("eval", 0)]
    rl = {p.question for p in task.split("rl", 0)}
    for name, records in out.items():
        assert records and not {r["instruction"] for r in records} & rl
        for r in records:
            assert set(r) == {"instruction", "input", "output"} and r["input"] == ""
            assert r["output"].split("\n")[-1].startswith("Answer: ")
            assert task.reward(r["output"], task.make_problem(*_parse(r["instruction"]))) == 1.0
    gsm = sft_splits("gsm8k", 0)
    assert sum(len(v) for v in gsm.values()) < 1319  # the RL split is held back
    first = gsm["train"][0]
    assert "<<" not in first["output"] and first["output"].split("\n")[-1].startswith("#### ")
    with pytest.raises(UserError, match="unknown task 'algebra'"):
        sft_splits("algebra", 0)


def _parse(question: str):
    tokens = question.removeprefix("What is ").removesuffix("?").split()
    return [int(t) for t in tokens[::2]], tokens[1::2]


def test_gsm8k_bundled_and_files(tmp_path):
    task = get_task("gsm8k")
    every = task.problems()
    assert len(every) == 1319 and every[0].answer == "18"
    assert all(p.solution.endswith(f"#### {p.solution.split('#### ')[1]}") for p in every)
    assert sum(len(task.split(s, 0)) for s in ("sft", "val", "rl", "eval")) == 1319
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,004"}) + "\n")
    p = get_task("gsm8k", str(path)).problems()[0]
    assert p.answer == "1004" and p.solution == "2 + 2 = 4\n#### 1,004"
    assert get_task(f"gsm8k:path={path}").path == str(path)
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps({"question": "q", "answer": "#### 3"}) + "\n")
    assert get_task("gsm8k", str(tmp_path / "z.jsonl.gz")).problems()[0].answer == "3"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"question": "q"}\n', "line 1 has no answer field 'answer'"),
        ('{"answer": "#### 4"}\n', "line 1 has no question field 'question'"),
        ('{"question": "q", "answer": "#### 4"}\n{"question": "q2", "answer": "4"}\n',
         "record 2: the answer field has no final answer"),
        ('{"question": "q", "answer": "#### 4"}\n{"question": \n', "line 2 is not valid JSON"),
    ],
)
def test_gsm8k_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        get_task("gsm8k", str(path)).problems()


@pytest.mark.parametrize(
    "spec, path, message",
    [
        ("chess", "", "unknown task 'chess'"),
        ("arithmetic:digits=0", "", "digits must be 1..6"),
        ("arithmetic:operands=1", "", "operands must be 2..6"),
        ("arithmetic:ops=+/", "", "ops must be distinct characters"),
        ("arithmetic:digits=two", "", "option digits must be an integer"),
        ("arithmetic:colour=red", "", "unknown option 'colour'"),
        ("arithmetic:style=diagonal", "", "style must be chain or column"),
        ("arithmetic:style=column", "", "style=column adds only"),
        ("arithmetic:digits", "", "options are key=value"),
        ("arithmetic", "data.jsonl", "reads no data file"),
        ("gsm8k", "/nonexistent/x.jsonl", "not found"),
    ],
)
def test_bad_task_specs(spec, path, message):
    with pytest.raises(UserError, match=message):
        task = get_task(spec, path)
        task.split("eval", 0)
