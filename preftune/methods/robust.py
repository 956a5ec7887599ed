"""Robust DPO (Chowdhury et al. 2024): unbiased under a known label flip rate."""

from __future__ import annotations

from pydantic import Field

from preftune.losses.robust import robust_dpo_loss
from preftune.methods.base import BetaSettings, Method, ReferenceRatioLoss, sums


class RobustSettings(BetaSettings):
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="ε: the label flip rate the loss corrects for")


METHOD = Method(
    name="robust",
    summary="robust DPO for noisy labels: unbiased under a label flip rate ε = label_smoothing",
    settings=RobustSettings,
    build_loss=lambda s: ReferenceRatioLoss(robust_dpo_loss, sums, {"beta": s.beta, "label_smoothing": s.label_smoothing}),
)
