"""Automatic scores of generated responses against reference responses.

    exact_match("Paris. ", "Paris.")            # 1.0: equal after stripping surrounding whitespace
    rouge_l_f1("the cat sat", "the cat ate")   # 0.667: LCS-based F1 over ROUGE's tokens
    score_responses(predictions, references)  # {"exact_match": mean, "rougeL_f1": mean, "per_record": [...]}

ROUGE-L is `rouge_score.rouge_scorer.RougeScorer(["rougeL"])` (Google's reimplementation of
Lin 2004): text is lowercased, every run of non-[a-z0-9] characters splits tokens, and with
LCS = the longest common subsequence of the token lists, P = LCS / len(prediction),
R = LCS / len(reference), F1 = 2PR / (P + R) (0 when either side has no tokens).
"""
from __future__ import annotations

import functools
from typing import Sequence


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after stripping surrounding whitespace, else 0.0."""
    return float(prediction.strip() == reference.strip())


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of `prediction` against `reference` (see the module docstring)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score_responses(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean exact match and ROUGE-L F1 over pairs, plus the per-pair scores (None means
    when there are no pairs)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    per = [{"exact_match": exact_match(p, r), "rougeL_f1": rouge_l_f1(p, r)}
           for p, r in zip(predictions, references)]
    mean = lambda k: sum(s[k] for s in per) / len(per) if per else None  # noqa: E731
    return {"exact_match": mean("exact_match"), "rougeL_f1": mean("rougeL_f1"), "per_record": per}
