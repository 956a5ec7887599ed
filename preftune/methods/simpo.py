"""SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin."""

from __future__ import annotations

from pydantic import Field

from preftune.losses.simpo import simpo_loss
from preftune.methods.base import BetaSettings, Method, PolicyOnlyLoss, means


class SimPOSettings(BetaSettings):
    simpo_gamma: float = Field(0.5, description="target margin γ in −log σ(β·Δavg − γ) (TRL's simpo_gamma)")
    simpo_sft_weight: float = Field(0.0, ge=0.0, description="weight of an SFT (NLL) term on the chosen answer")


METHOD = Method(
    name="simpo",
    summary="SimPO: reference-free −log σ(β · per-token log-prob margin − simpo_gamma) (+ simpo_sft_weight · NLL)",
    settings=SimPOSettings,
    needs_reference=False,
    build_loss=lambda s: PolicyOnlyLoss(
        simpo_loss, means, {"beta": s.beta, "gamma": s.simpo_gamma, "sft_weight": s.simpo_sft_weight}
    ),
)
