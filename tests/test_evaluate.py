"""Validation summaries: one tie rule for every ranking number, and the length-normalised margin."""

from __future__ import annotations

import pytest

from preftune.methods.evaluation import TIE_TOLERANCE, per_token_margin, summarize_evaluation


def _row(margin: float, policy=(-4.0, -6.0), reference=(-4.0, -6.0), tokens=(2, 3)) -> dict:
    return {
        "example": 0, "origin": "f:1", "prompt_tokens": 5, "answer_tokens": list(tokens),
        "policy_logps": list(policy), "reference_logps": list(reference), "loss": 0.0, "rewards/margins": margin,
    }


def test_ties_within_float_noise_count_as_neither_right_nor_wrong():
    margins = [TIE_TOLERANCE / 10, -TIE_TOLERANCE / 10, 0.5, -0.5, -0.01]
    summary = summarize_evaluation([_row(m) for m in margins])
    assert summary["eval/negative_margin_fraction"] == pytest.approx(2 / 5)
    assert summary["eval/rewards/accuracies"] == pytest.approx(1 / 5)
    assert summary["eval/tie_fraction"] == pytest.approx(2 / 5)
    assert summary["eval/rewards/margins"] == pytest.approx(sum(margins) / 5)
    assert summary["eval/num_pairs"] == 5.0


def test_length_normalised_margin_is_per_token_means_minus_the_reference():
    # policy means c = -4/2 = -2, r = -6/3 = -2; reference means c = -6/2 = -3, r = -3/3 = -1
    row = _row(0.0, policy=(-4.0, -6.0), reference=(-6.0, -3.0))
    assert per_token_margin(row) == pytest.approx((-2 - -2) - (-3 - -1))  # = +2
    # The summed implicit-reward margin can disagree in sign with the length-normalised one.
    rows = [row, _row(0.0, policy=(-4.0, -6.0), reference=(-2.0, -9.0))]  # second: (0) - (-1 + 3) = -2
    summary = summarize_evaluation(rows)
    assert summary["eval/negative_margin_fraction_per_token"] == pytest.approx(0.5)
    assert summary["eval/logps/chosen"] == pytest.approx(-2.0)
    assert summary["eval/logps/rejected"] == pytest.approx(-2.0)
