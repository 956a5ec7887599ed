"""DPO (Rafailov et al. 2023), sigmoid form, with conservative label smoothing (cDPO)."""

from __future__ import annotations

from pydantic import Field

from preftune.losses.dpo import dpo_loss
from preftune.methods.base import BetaSettings, Method, ReferenceRatioLoss, sums


class DPOSettings(BetaSettings):
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="ε: assumed rate of flipped labels (cDPO); 0 = plain DPO")


METHOD = Method(
    name="sigmoid",
    aliases=("dpo",),
    summary="DPO: -log σ(β · policy/reference log-ratio margin); label_smoothing for noisy labels",
    settings=DPOSettings,
    build_loss=lambda s: ReferenceRatioLoss(dpo_loss, sums, {"beta": s.beta, "label_smoothing": s.label_smoothing}),
)
