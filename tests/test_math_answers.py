"""The math verifier: final answers found the ways models write them, normalised, compared
exactly or by sympy within a time limit; every answer of the bundled GSM8K test split written
three ways is right, and wrong answers are wrong."""
from __future__ import annotations

import gzip
import json
import time
from importlib import resources

import pytest

from jaxgpt.rl.math_answers import (MathVerifier, as_number, canonical, extract_final, is_correct, normalize,
                                    to_sympy_syntax)


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout=2.0)
    yield v
    v.close()


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234\nthat's all", "1,234"),
    ("first #### 3 then\n#### 5", "5"),  # the last marker
    ("We get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} no, \\boxed{\\sqrt{2}}", "\\sqrt{2}"),  # the last box
    ("\\boxed{a_{1}+{b}}", "a_{1}+{b}"),  # balanced braces
    ("\\fbox{12}", "12"),
    ("#### 4 but \\boxed{5}", "5"),  # a box wins over ####
    ("So the answer is 42.", "42."),
    ("The final answer is: $18$ dollars", "$18$ dollars"),
    ("Answer: -3\nbye", "-3"),
    ("ANSWER IS 5", None),  # no "the"
    ("no answer here", None),
    ("\\boxed{", None),
    ("#### ", None),
])
def test_extract_final(text, expected):
    assert extract_final(text) == expected


@pytest.mark.parametrize("raw, expected", [
    ("1,234", "1234"), ("1{,}234", "1234"), ("$1,234.50", "1234.50"), ("\\$18", "18"), ("18 dollars", "18"),
    ("50%", "50"), ("50\\%", "50"), ("50 percent", "50"), ("90^\\circ", "90"), ("90°", "90"), ("42.", "42"),
    ("18 apples", "18"), ("5 cm", "5"), ("3.5 km per hour", "3.5"), ("x = 5", "5"), ("\\text{5 cm}", "5"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"), ("$\\frac{1}{2}$", "\\frac{1}{2}"), ("\\(7\\)", "7"), ("−4", "-4"),
    ("\\left(1\\right)", "(1)"), ("2x", "2x"), ("", None), ("  .", None), (None, None),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_numbers_compare_exactly():
    assert as_number("3.50") == as_number("3.5") == as_number("7/2") == as_number("\\frac{7}{2}") == as_number("\\frac72")
    assert as_number("-0.0") == as_number("0") and as_number(".5") == as_number("1/2")
    assert as_number("1e5") is None and as_number("2x") is None and as_number("1/0") is None
    assert as_number("1" * 200) is None  # no huge numbers from model output
    assert [canonical(x) for x in ("1,004", "3.50", "\\frac{1}{3}", "-0", "0.125", "\\sqrt{2}")] == \
        ["1004", "3.5", "1/3", "0", "0.125", "\\sqrt{2}"]


def test_sympy_syntax_is_whitelisted():
    assert to_sympy_syntax("\\frac{\\sqrt{8}}{2}") == "((sqrt(8))/(2))"
    assert to_sympy_syntax("2^{10} \\cdot x") == "2**(10) * x"
    for bad in ("__import__('os')", "exec(1)", "lambda: 1", "a.b", "x; y", "open", "\\int x dx", "x" * 300):
        assert to_sympy_syntax(bad) is None, bad


@pytest.mark.parametrize("answer, reference, expected", [
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\frac{\\pi}{2}", "\\pi/2", True), ("(x-1)(x+1)", "x^2-1", True),
    ("\\frac{2}{4}", "0.5", True), ("x^2", "x^3", False), ("\\sqrt{2}", "1.414", False), ("1/3", "0.333", False),
    ("\\frac{1}{0}", "1", False), ("x +", "x", False),  # unparsable: not equal, no error
])
def test_symbolic_equivalence(verifier, answer, reference, expected):
    assert verifier.equivalent(normalize(answer), canonical(reference)) is expected


def test_a_hanging_comparison_times_out(verifier):
    """sympy on a tower of powers would run for ever: the worker is killed at the time limit,
    the answer is wrong, and the next comparison gets a fresh worker."""
    quick = MathVerifier(timeout=1.0)
    try:
        start = time.perf_counter()
        assert quick.equivalent("9^{9^{9^{9}}}", "1") is False
        assert time.perf_counter() - start < 30 and quick.timeouts == 1
        assert quick.equivalent("2\\sqrt{2}", "\\sqrt{8}") is True  # restarted
    finally:
        quick.close()


def _gsm8k_answers() -> list[str]:
    path = resources.files("jaxgpt.data.bundled") / "gsm8k-test.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["answer"] for line in f]


def test_every_gsm8k_answer_written_three_ways(verifier):
    """Each of the 1,319 references: GSM8K's own "#### 1,234", a boxed currency amount with
    LaTeX thousands separators and trailing zeros, and "the answer is" with a fraction and a
    unit word; then five wrong answers for each."""
    answers = _gsm8k_answers()
    assert len(answers) == 1319
    for solution in answers:
        reference = canonical(extract_final(solution))
        value = int(reference)  # every GSM8K test answer is an integer
        written = [f"Step by step...\n#### {value:,}",
                   f"She pays \\boxed{{\\${value:,}.00}}".replace(",", "{,}"),
                   f"Therefore the answer is \\frac{{{2 * value}}}{{2}} apples."]
        for text in written:
            assert is_correct(text, reference, verifier), (text, reference)
        wrong = [f"#### {value + 1}", f"\\boxed{{{value * 10 + 1}}}", f"The answer is {value}.5",
                 f"#### {-value - 1}", "The answer is unknown."]
        for text in wrong:
            assert not is_correct(text, reference, verifier), (text, reference)
    assert verifier.timeouts == 0


def test_gsm8k_task_uses_the_math_verifier(tmp_path):
    from jaxgpt.rl.tasks import get_task

    task = get_task("gsm8k")
    p = task.problems()[0]
    assert p.answer == "18"
    assert task.reward("She makes $18 every day.\nThe answer is $18.", p) == 1.0
    assert task.reward("\\boxed{18.0}", p) == 1.0 and task.reward("#### 17", p) == 0.0
    assert task.extract("\\boxed{\\$18}") == "18" and task.extract("eighteen") is None
    strict = get_task("gsm8k:verifier=strict")
    assert strict.reward("\\boxed{18}", strict.problems()[0]) == 0.0
    assert strict.reward("#### 18", strict.problems()[0]) == 1.0
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"question": "Half?", "answer": "It is \\boxed{\\frac{1}{2}}"}) + "\n")
    q = get_task("gsm8k", str(path)).problems()[0]
    assert q.answer == "0.5" and get_task("gsm8k", str(path)).reward("#### 1/2", q) == 1.0
    with pytest.raises(Exception, match="verifier must be one of"):
        get_task("gsm8k:verifier=loose")
