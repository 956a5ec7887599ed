"""Supervised fine-tuning on the chosen answers: the reward-free baseline the preference losses are compared with."""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, LossSpec, PairLogps, reward_metrics


def sft_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> LossOutput:
    """Per-pair SFT loss from per-token MEAN answer log-probs of the policy ([pairs] each).

        loss = −avg log πθ(c)

    The rejected answer is not trained on; it is scored only so the run reports the same
    preference metrics as the other losses, with the per-token log-prob as the reward:
    r(c) = avg log πθ(c), r(r) = avg log πθ(r). No reference model.
    """
    return LossOutput(-policy_chosen, reward_metrics(policy_chosen, policy_rejected))


class SFTLoss:
    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        return sft_loss(policy.chosen.mean, policy.rejected.mean)


SPEC = LossSpec(
    name="sft",
    build=lambda method: SFTLoss(),
    needs_reference=False,
    summary="SFT baseline: −per-token log-prob of the chosen answer; rejected answers only scored",
)
