"""SLiC hinge loss (Zhao et al. 2023) on the policy/reference log-ratio margin."""

from __future__ import annotations

from preftune.losses.hinge import hinge_loss
from preftune.methods.base import BetaSettings, Method, ReferenceRatioLoss, sums

METHOD = Method(
    name="hinge",
    summary="SLiC hinge: max(0, 1 − β · policy/reference log-ratio margin)",
    settings=BetaSettings,
    build_loss=lambda s: ReferenceRatioLoss(hinge_loss, sums, {"beta": s.beta}),
)
