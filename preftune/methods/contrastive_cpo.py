"""Contrastive Preference Optimization (Xu et al. 2024): TRL's "CPO". Not preftune's constrained `cpo`."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from preftune.losses import LossOutput
from preftune.losses.contrastive_cpo import contrastive_cpo_loss
from preftune.methods.base import BetaSettings, Method, PairLogps


class ContrastiveCPOSettings(BetaSettings):
    cpo_alpha: float = Field(1.0, ge=0.0, description="weight of the NLL term (TRL's cpo_alpha)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="ε of the preference term (0 in the paper)")


@dataclass(frozen=True)
class ContrastiveCPOLoss:
    settings: ContrastiveCPOSettings

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        s = self.settings
        return contrastive_cpo_loss(
            policy.chosen.sum, policy.rejected.sum, policy.chosen.mean,
            beta=s.beta, alpha=s.cpo_alpha, label_smoothing=s.label_smoothing,
        )


METHOD = Method(
    name="contrastive_cpo",
    summary=(
        "CONTRASTIVE CPO (Xu et al. 2024; TRL's CPOTrainer): reference-free -log σ(β(log πθ(c) − log πθ(r))) "
        "+ cpo_alpha · NLL(chosen). Not preftune's constrained cpo"
    ),
    settings=ContrastiveCPOSettings,
    needs_reference=False,
    build_loss=ContrastiveCPOLoss,
)
