"""Supervised fine-tuning on the chosen answers: the reward-free baseline the preference losses are compared with."""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, reward_metrics


def sft_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> LossOutput:
    """Per-pair SFT loss from per-token MEAN answer log-probs of the policy ([pairs] each).

        loss = −avg log πθ(c)

    The rejected answer is not trained on; it is scored only so the run reports the same
    preference metrics as the other losses, with the per-token log-prob as the reward:
    r(c) = avg log πθ(c), r(r) = avg log πθ(r). No reference model.
    """
    return LossOutput(-policy_chosen, reward_metrics(policy_chosen, policy_rejected))
