"""What every loss takes and returns, and the registry entry that declares what a method needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from preftune.logprobs import SequenceLogps


@dataclass
class PairLogps:
    """Answer log-probs of one model for a batch of preference pairs ([pairs] each)."""

    chosen: SequenceLogps
    rejected: SequenceLogps

    def detach(self) -> PairLogps:
        return PairLogps(self.chosen.detach(), self.rejected.detach())


@dataclass
class LossOutput:
    """Per-pair loss ([pairs]) and per-pair metrics ([pairs] each), reduced by the trainer.

    The trainer averages `losses` over every pair of an optimiser step (across micro-batches
    and processes), which keeps gradient accumulation exact.
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(Protocol):
    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput: ...


@dataclass(frozen=True)
class LossSpec:
    """A method = a loss plus what it needs. The trainer knows methods only through this."""

    name: str
    build: Callable[[Any], Loss]  # method config -> loss callable
    needs_reference: bool
    summary: str
    paired: bool = True
    # Controllers the method brings (e.g. CPO's Lagrange multiplier), built around its loss.
    controllers: Callable[[Loss, Any], list] = lambda loss, method: []


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics every pairwise loss reports, from implicit rewards ([pairs] each)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
    }
