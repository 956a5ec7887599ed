"""What every loss takes and returns, and the registry entry that declares what a method needs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from preftune.data.collate import PackedBatch, collate_pairs, collate_unpaired
from preftune.logprobs import SequenceLogps


@dataclass
class PairLogps:
    """Answer log-probs of one model for a batch of preference pairs ([pairs] each)."""

    chosen: SequenceLogps
    rejected: SequenceLogps

    def detach(self) -> PairLogps:
        return PairLogps(self.chosen.detach(), self.rejected.detach())

    def answer_logps(self) -> dict[str, torch.Tensor]:
        """Per-token mean log-probs for evaluation ([pairs] each)."""
        return {"logps/chosen": self.chosen.mean, "logps/rejected": self.rejected.mean}


@dataclass
class UnpairedLogps:
    """Answer log-probs of one model for a batch of unpaired (KTO) examples ([examples] each).

    `mismatched` scores another example's completion under this example's prompt (see
    `collate_unpaired`); `desirable` is the example's label.
    """

    completion: SequenceLogps
    mismatched: SequenceLogps
    desirable: torch.Tensor  # [examples] bool

    def answer_logps(self) -> dict[str, torch.Tensor]:
        return {"logps/completion": self.completion.mean}


@dataclass(frozen=True)
class ExampleLayout:
    """How a method's examples are packed for the log-prob engine, and how its log-probs come back to the loss."""

    collate: Callable[..., PackedBatch]  # (examples, *, pad_id) -> PackedBatch
    split: Callable[[SequenceLogps, Sequence], PairLogps | UnpairedLogps]  # (engine output, examples) -> loss input


def _pair_logps(logps: SequenceLogps, examples: Sequence) -> PairLogps:
    return PairLogps(*logps.by_answer(2))


def _unpaired_logps(logps: SequenceLogps, examples: Sequence) -> UnpairedLogps:
    completion, mismatched = logps.by_answer(2)
    desirable = torch.tensor([example.label for example in examples], dtype=torch.bool, device=completion.sum.device)
    return UnpairedLogps(completion, mismatched, desirable)


PAIRED = ExampleLayout(collate_pairs, _pair_logps)
UNPAIRED = ExampleLayout(collate_unpaired, _unpaired_logps)


@dataclass
class LossOutput:
    """Per-pair loss ([pairs]) and per-pair metrics ([pairs] each), reduced by the trainer.

    The trainer averages `losses` over every pair of an optimiser step (across micro-batches
    and processes), which keeps gradient accumulation exact.
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(Protocol):
    def __call__(self, policy: PairLogps | UnpairedLogps, reference: PairLogps | UnpairedLogps | None) -> LossOutput: ...


@dataclass(frozen=True)
class LossSpec:
    """A method = a loss plus what it needs. The trainer knows methods only through this."""

    name: str
    build: Callable[[Any], Loss]  # method config -> loss callable
    needs_reference: bool
    summary: str
    paired: bool = True  # False: unpaired {prompt, completion, label} examples (KTO); paired files are unpaired on load
    # Examples each micro-batch needs at least (KTO estimates its KL baseline from the other examples).
    min_batch_size: int = 1
    # Controllers the method brings (e.g. CPO's Lagrange multiplier), built around its loss.
    controllers: Callable[[Loss, Any], list] = lambda loss, method: []

    @property
    def layout(self) -> ExampleLayout:
        return PAIRED if self.paired else UNPAIRED


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


@dataclass(frozen=True)
class ReferenceRatioLoss:
    """Adapts a pure loss of (policy c, policy r, reference c, reference r) log-probs to the `Loss` protocol.

    `statistic` picks summed ("sum") or per-token mean ("mean") answer log-probs; `options` are the
    loss function's keyword arguments, taken from the method config by the loss's SPEC.
    """

    function: Callable[..., LossOutput]
    statistic: str
    options: dict[str, Any]

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        if reference is None:
            raise ValueError(f"{self.function.__name__} needs reference log-probs")
        return self.function(
            getattr(policy.chosen, self.statistic),
            getattr(policy.rejected, self.statistic),
            getattr(reference.chosen, self.statistic),
            getattr(reference.rejected, self.statistic),
            **self.options,
        )
