"""KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable completions."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from preftune.losses import LossOutput
from preftune.losses.kto import kto_loss
from preftune.methods.base import BetaSettings, DataShape, Method, UnpairedLogps


class KTOSettings(BetaSettings):
    desirable_weight: float = Field(1.0, gt=0.0, description="weight λ_D of desirable (label true) examples")
    undesirable_weight: float = Field(1.0, gt=0.0, description="weight λ_U of undesirable (label false) examples")


@dataclass(frozen=True)
class KTOLoss:
    settings: KTOSettings

    def __call__(self, policy: UnpairedLogps, reference: UnpairedLogps | None) -> LossOutput:
        if reference is None:
            raise ValueError("KTO needs reference log-probs")
        s = self.settings
        return kto_loss(
            policy.completion.sum, policy.mismatched.sum, reference.completion.sum, reference.mismatched.sum,
            policy.desirable, beta=s.beta, desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight,
        )


METHOD = Method(
    name="kto",
    summary=(
        "KTO: unpaired {prompt, completion, label} data (paired files are split into chosen=true / rejected=false); "
        "λ · (1 − σ(±β(log-ratio − z_ref))), z_ref from mismatched completions"
    ),
    settings=KTOSettings,
    data_shape=DataShape.UNPAIRED,
    min_batch_size=2,
    build_loss=KTOLoss,
)
