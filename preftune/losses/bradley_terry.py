"""The Bradley–Terry reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT),
with the optional per-pair margin of Llama 2 (Touvron et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BradleyTerryOutput:
    """Per-pair loss and per-pair metrics ([pairs] each)."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *, margin: torch.Tensor | float = 0.0
) -> BradleyTerryOutput:
    """loss_i = −log σ(r_c,i − r_r,i − m_i) for scalar rewards `[pairs]` and a margin (scalar or `[pairs]`).

    Metrics: `reward/accuracy` (1 when r_c > r_r, strictly), `reward/margin` (r_c − r_r),
    `reward/chosen`, `reward/rejected`.
    """
    difference = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(difference - margin)
    metrics = {
        "reward/accuracy": (difference > 0).float().detach(),
        "reward/margin": difference.detach(),
        "reward/chosen": chosen_rewards.detach(),
        "reward/rejected": rejected_rewards.detach(),
    }
    return BradleyTerryOutput(losses, metrics)
