"""Response scores: exact match and ROUGE-L F1 against hand-computed values."""
from __future__ import annotations

import pytest

from jaxgpt.text.scoring import exact_match, rouge_l_f1, score_responses


def _f1(lcs: int, n_pred: int, n_ref: int) -> float:
    p, r = lcs / n_pred, lcs / n_ref
    return 2 * p * r / (p + r) if p + r else 0.0


# (prediction, reference, LCS, prediction tokens, reference tokens), counted by hand on
# ROUGE's tokens (lowercased, punctuation dropped).
PAIRS = [
    # the cat [sat] on [the] mat / the cat [is] on [a] mat: LCS "the cat on mat"
    ("the cat is on a mat", "The cat sat on the mat.", 4, 6, 6),
    # paris is the capital of france / the capital is paris: LCS "the capital"
    ("The capital is Paris.", "Paris is the capital of France.", 2, 4, 6),
    # he quickly ran home / he ran home quickly: LCS "he ran home"
    ("He ran home quickly", "He quickly ran home", 3, 4, 4),
    # nothing in common
    ("Goodbye", "Hello world", 0, 1, 2),
]


@pytest.mark.parametrize("pred, ref, lcs, n_pred, n_ref", PAIRS)
def test_rouge_l_matches_the_lcs_by_hand(pred, ref, lcs, n_pred, n_ref):
    assert rouge_l_f1(pred, ref) == pytest.approx(_f1(lcs, n_pred, n_ref), abs=1e-12)


def test_hand_values():
    assert rouge_l_f1("the cat is on a mat", "The cat sat on the mat.") == pytest.approx(2 / 3)
    assert rouge_l_f1("The capital is Paris.", "Paris is the capital of France.") == pytest.approx(0.4)
    assert rouge_l_f1("Same words, here!", "same WORDS here") == 1.0


def test_exact_match_strips_whitespace_only():
    assert exact_match("  Paris.\n", "Paris.") == 1.0
    assert exact_match("paris.", "Paris.") == 0.0
    assert exact_match("Paris", "Paris.") == 0.0
    assert exact_match("", "  ") == 1.0


def test_score_responses_means():
    preds = [p for p, *_ in PAIRS] + ["exact"]
    refs = [r for _, r, *_ in PAIRS] + [" exact "]
    out = score_responses(preds, refs)
    per = [_f1(lcs, a, b) for _, _, lcs, a, b in PAIRS] + [1.0]
    assert out["rougeL_f1"] == pytest.approx(sum(per) / len(per))
    assert out["exact_match"] == pytest.approx(1 / 5)
    assert [s["exact_match"] for s in out["per_record"]] == [0, 0, 0, 0, 1]
    assert score_responses([], []) == {"exact_match": None, "rougeL_f1": None, "per_record": []}
    with pytest.raises(ValueError):
        score_responses(["a"], [])
