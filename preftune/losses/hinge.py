"""Hinge loss on the DPO log-ratio margin (SLiC-HF, Zhao et al. 2023; TRL's `hinge`)."""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, implicit_reward_metrics


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Per-pair hinge loss from summed answer log-probs ([pairs] each).

        h    = β · [(log πθ(c) − log πθ(r)) − (log πref(c) − log πref(r))]
        loss = max(0, 1 − h)

    Pairs whose scaled margin already exceeds 1 contribute no gradient; 1/β is the log-ratio
    margin asked for. Implicit rewards: β (log πθ(c) − log πref(c)), likewise r.
    """
    logits = beta * ((policy_chosen - policy_rejected) - (reference_chosen - reference_rejected))
    return LossOutput(
        torch.relu(1.0 - logits),
        implicit_reward_metrics(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected),
    )
