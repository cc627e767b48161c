"""A lenient math verifier: final answers read the ways models write them, normalised, and
compared for equivalence (exactly as numbers, else by sympy under a per-answer time limit).

    extract_final("... so she has \\boxed{\\$1{,}234.50}")   -> "\\$1{,}234.50"
    normalize("\\$1{,}234.50")                               -> "1234.50"
    is_correct("The answer is 2469/2 dollars.", "1234.5")   -> True

Where the final answer is (`extract_final`), first match wins:
  1. the last `\\boxed{...}` / `\\fbox{...}` (balanced braces)
  2. the last `####` (GSM8K), to the end of its line
  3. the last "the (final) answer is" / "answer:" (any case), to the end of its line
Normalisation (`normalize`): math delimiters (`$...$`, `\\(...\\)`), `\\text{}`-like wrappers,
spacing commands, `\\left`/`\\right`, currency (`$`, `\\$`, dollars, USD, euro/pound signs),
percent (`%`, `\\%`, percent: "50%" is 50, as GSM8K writes percentages), degrees, thousands
commas ("1,234", "1{,}234"), a trailing full stop, unit words after a number ("18 apples",
"5 cm"), `x = ` before a value, and `\\dfrac`/`\\tfrac` as `\\frac`.
Equivalence (`equivalent`): when both sides are numbers (integers, decimals, `a/b`,
`\\frac{a}{b}`, with trailing zeros ignored) they compare exactly as fractions, no sympy;
otherwise both are translated from LaTeX to sympy syntax (`\\frac`, `\\sqrt`, `\\pi`, `^`,
`\\cdot`), checked against a whitelist (digits, operators, brackets, single-letter symbols,
`sqrt`, `pi`: model output never reaches `eval` otherwise), and compared with
`sympy.simplify(a - b) == 0` in a worker process. The worker gets `timeout` seconds per
answer (default 2): past that it is killed and restarted and the answer counts as wrong, so
an expression like `9^{9^{9^9}}` cannot hang a training run. One worker (a fresh `python -c`
process, not a fork of the JAX parent, and not signal-based, so it works off the main thread
too) serves every call of a process and starts on the first symbolic comparison only.
"""
from __future__ import annotations

import atexit
import json
import re
import select
import subprocess
import sys
from decimal import Decimal, localcontext
from fractions import Fraction

# ---------------------------------------------------------------------------------------
# Finding the final answer

_MARKERS = re.compile(r"(?:the\s+final\s+answer\s+is|the\s+answer\s+is|final\s+answer\s*:|answer\s*:)\s*:?",
                      re.IGNORECASE)


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """The contents of the brace group opening at `text[open_at] == "{"`, and the index after it."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i], i + 1
    return None


def _last_boxed(text: str) -> str | None:
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        got = _braced(text, m.end() - 1)
        if got is not None:
            return got[0]
    return None


def extract_final(text: str) -> str | None:
    """The final answer's raw text in a completion or a reference solution, or None (see
    the module docstring for the order)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    if "####" in text:
        line = text.rsplit("####", 1)[1].split("\n", 1)[0].strip()
        return line or None
    found = list(_MARKERS.finditer(text))
    if found:
        line = text[found[-1].end():].split("\n", 1)[0].strip()
        return line or None
    return None


# ---------------------------------------------------------------------------------------
# Normalising

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DROP = [r"\\left", r"\\right", r"\\!", r"\\,", r"\\;", r"\\:", r"\\ ", "~", r"\\displaystyle",
         r"\^\s*\{?\\circ\}?", "°", r"\\\$", r"\$", r"\\%", "%", "€", "£", r"\\euro", r"\\pounds"]
_WORDS = re.compile(r"\b(?:dollars?|usd|euros?|pounds?|percent|per\s+cent|degrees?|cents?)\b", re.IGNORECASE)
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT_TAIL = re.compile(rf"^({_NUMBER}(?:\s*/\s*\d+)?|\\frac\{{[^{{}}]*\}}\{{[^{{}}]*\}})"
                        r"\s+[A-Za-z][A-Za-z.]*(?:[\s/-]+[A-Za-z][A-Za-z.]*)*$")  # "18 apples", "5 km / h"


def normalize(raw: str | None) -> str | None:
    """A final answer's text normalised for comparison (see the module docstring), or None
    for nothing left."""
    if raw is None:
        return None
    s = raw.strip()
    for pair in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(pair[0]) and s.endswith(pair[1]):
            s = s[2:-2]
    s = s.replace("{,}", ",").replace("−", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for _ in range(3):
        s = _WRAPPERS.sub(r"\1", s)
    for pattern in _DROP:
        s = re.sub(pattern, "", s)
    s = _WORDS.sub("", s).strip()
    if re.match(r"^[A-Za-z]\s*=", s):  # "x = 5"
        s = s.split("=", 1)[1]
    s = s.strip().rstrip(".").strip()
    while re.search(r"\d,\d{3}(?!\d)", s):  # thousands separators
        s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    unit = _UNIT_TAIL.match(s)
    if unit:
        s = unit.group(1)
    s = re.sub(r"\s+", " ", s).strip()
    return s or None


def as_number(s: str | None) -> Fraction | None:
    """An exact value for a plain number: `-12`, `3.50`, `.5`, `7/2`, `\\frac{7}{2}`,
    `\\frac72`; None otherwise (and for anything over 100 characters)."""
    if s is None or len(s) > 100:
        return None
    s = s.replace(" ", "")
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?)\\frac(\d)(\d)", s)
    if m:
        sign, num, den = m.groups()
        s = f"{sign}{num}/{den}"
    m = re.fullmatch(rf"({_NUMBER})(?:/({_NUMBER}))?", s)
    if not m:
        return None
    try:
        value = Fraction(m.group(1)) / (Fraction(m.group(2)) if m.group(2) else 1)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def canonical(raw: str | None) -> str | None:
    """A reference answer's canonical text: numbers as "1234", "-0.5", "1/3"; anything else
    normalised (`normalize`); None if there is no answer."""
    s = normalize(raw)
    value = as_number(s)
    if value is None:
        return s
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:  # not a terminating decimal
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:
        ctx.prec = 200
        exact = Decimal(value.numerator) / Decimal(value.denominator)
    return "0" if exact == 0 else format(exact.normalize(), "f")


# ---------------------------------------------------------------------------------------
# LaTeX to sympy syntax, whitelisted

_ALLOWED = re.compile(r"^[0-9A-Za-z+\-*/().^ ]*$")
_NAMES = {"sqrt", "pi"}


def to_sympy_syntax(s: str) -> str | None:
    """`s` (normalised LaTeX) in sympy's input syntax, or None when it holds anything but
    numbers, + - * / ^, brackets, single-letter symbols, sqrt and pi."""
    if len(s) > 200:
        return None
    out = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", " pi ").replace("\\div", "/")
    for _ in range(20):  # \frac{a}{b} and \sqrt{a}, innermost first
        m = re.search(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", out)
        if m:
            out = out[:m.start()] + f"(({m.group(1)})/({m.group(2)}))" + out[m.end():]
            continue
        m = re.search(r"\\sqrt\{([^{}]*)\}", out)
        if m:
            out = out[:m.start()] + f"sqrt({m.group(1)})" + out[m.end():]
            continue
        break
    out = out.replace("{", "(").replace("}", ")").replace("[", "(").replace("]", ")")
    if not _ALLOWED.match(out) or "__" in out or re.search(r"[A-Za-z]\s*\.|\.\s*[A-Za-z]", out):
        return None  # no attribute access
    names = set(re.findall(r"[A-Za-z]{2,}", out))
    if names - _NAMES:
        return None
    return out.replace("^", "**")


# The worker: a separate Python process (`python -c`, no jaxgpt import, no fork of the JAX
# parent) reading `[a, b]` JSON lines and answering 1 / 0.
_WORKER = """
import json, sys
from sympy import simplify
from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations
T = standard_transformations + (implicit_multiplication_application,)
def equal(a, b):
    ea, eb = (parse_expr(x, transformations=T, evaluate=True) for x in (a, b))
    return ea == eb or simplify(ea - eb) == 0
print("ready", flush=True)
for line in sys.stdin:
    try:
        ok = bool(equal(*json.loads(line)))
    except Exception:
        ok = False
    print(1 if ok else 0, flush=True)
"""


class MathVerifier:
    """Compares answers; symbolic ones in one worker process with a per-answer time limit.

    timeout: seconds a symbolic comparison may take (then: not equal, worker restarted).
    `timeouts` counts them."""

    def __init__(self, timeout: float = 2.0, startup_timeout: float = 120.0):
        self.timeout, self.startup_timeout = timeout, startup_timeout
        self.process = None
        self.timeouts = 0

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return self.process.stdout.readline().strip() if ready else None

    def _start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        if self._readline(self.startup_timeout) != "ready":
            self.close()
            raise RuntimeError("the math verifier's sympy worker did not start")

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for f in (self.process.stdin, self.process.stdout):
                f.close()
        self.process = None

    def symbolic_equal(self, a: str, b: str) -> bool:
        """sympy's verdict on two whitelisted expressions, False past the time limit."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        self.process.stdin.write(json.dumps([a, b]) + "\n")
        self.process.stdin.flush()
        answer = self._readline(self.timeout)
        if answer is None:
            self.timeouts += 1
            self.close()  # it may be computing forever: kill it, the next call starts a fresh one
            return False
        return answer == "1"

    def equivalent(self, answer: str | None, reference: str | None) -> bool:
        """Are two normalised answers equal (numbers exactly, else by sympy)?"""
        if answer is None or reference is None:
            return False
        if answer == reference:
            return True
        x, y = as_number(answer), as_number(reference)
        if x is not None and y is not None:
            return x == y
        a, b = to_sympy_syntax(answer), to_sympy_syntax(reference)
        if a is None or b is None:
            return False
        return self.symbolic_equal(a, b)


_DEFAULT: MathVerifier | None = None


def default_verifier() -> MathVerifier:
    """The process's shared verifier (one worker, closed at exit)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MathVerifier()
        atexit.register(_DEFAULT.close)
    return _DEFAULT


def is_correct(completion: str, reference: str, verifier: MathVerifier | None = None) -> bool:
    """Does `completion`'s final answer equal `reference` (a canonical answer)?"""
    return (verifier or default_verifier()).equivalent(normalize(extract_final(completion)), reference)


__all__ = ["MathVerifier", "as_number", "canonical", "default_verifier", "extract_final", "is_correct", "normalize",
           "to_sympy_syntax"]
