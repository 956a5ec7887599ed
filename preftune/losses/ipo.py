"""IPO (Azar et al. 2023): a squared loss that keeps the log-ratio margin at 1/(2β) instead of pushing it to ∞."""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, implicit_reward_metrics


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Per-pair IPO loss from per-token MEAN answer log-probs ([pairs] each).

        h    = (log πθ(c) − log πθ(r)) − (log πref(c) − log πref(r))     per-token means
        loss = (h − 1/(2β))²

    The means (not sums) are the length normalisation the IPO authors and TRL use; with sums,
    long answers would need a far larger margin to reach the same target.
    Implicit rewards: β (log πθ(c) − log πref(c)), likewise r, on the same per-token means.
    """
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = (margin - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(
        losses,
        implicit_reward_metrics(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected),
    )
