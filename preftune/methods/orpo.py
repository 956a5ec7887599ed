"""ORPO (Hong et al. 2024): NLL plus an odds-ratio preference term, no reference."""

from __future__ import annotations

from preftune.losses.orpo import orpo_loss
from preftune.methods.base import BetaSettings, Method, PolicyOnlyLoss, means

METHOD = Method(
    name="orpo",
    summary="ORPO: reference-free NLL(chosen) − β · log σ(log odds ratio of chosen over rejected)",
    settings=BetaSettings,
    needs_reference=False,
    build_loss=lambda s: PolicyOnlyLoss(orpo_loss, means, {"beta": s.beta}),
)
