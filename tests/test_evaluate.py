"""Validation summaries: the negative-margin fraction counts rankings, not float noise around a tie."""

from __future__ import annotations

import pytest
import torch

from preftune.eval.evaluate import TIE_TOLERANCE, summarize_evaluation


def test_negative_margin_fraction_ignores_ties_within_float_noise():
    margins = torch.tensor([TIE_TOLERANCE / 10, -TIE_TOLERANCE / 10, 0.5, -0.5, -0.01])
    summary = summarize_evaluation({"loss": torch.zeros(5), "rewards/margins": margins})
    assert summary["eval/negative_margin_fraction"] == pytest.approx(2 / 5)
    assert summary["eval/rewards/margins"] == pytest.approx(margins.mean().item())
    assert summary["eval/num_pairs"] == 5.0
