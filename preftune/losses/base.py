"""What every loss returns, and the reward metrics the pairwise losses share. Formulas only: no data, no models."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """Per-example loss ([examples]) and per-example metrics ([examples] each), reduced by the trainer.

    The trainer averages `losses` over every example of an optimiser step (across micro-batches
    and processes), which keeps gradient accumulation exact.
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics every pairwise loss reports, from implicit rewards ([pairs] each)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
    }


def implicit_reward_metrics(
    beta: float,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """`reward_metrics` of the DPO-style implicit rewards β (log πθ(y) − log πref(y))."""
    return reward_metrics(beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected))
