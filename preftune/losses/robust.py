"""Robust DPO (Chowdhury et al. 2024): an unbiased DPO loss when a known fraction of labels is flipped."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, implicit_reward_metrics


def robust_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Per-pair robust DPO loss from summed answer log-probs ([pairs] each).

        h    = β · [(log πθ(c) − log πθ(r)) − (log πref(c) − log πref(r))]
        loss = [−(1 − ε) · log σ(h) + ε · log σ(−h)] / (1 − 2ε)

    ε = `label_smoothing` is the rate at which labels are flipped (0 ≤ ε < 0.5). Unlike cDPO
    (`sigmoid` with label smoothing), the flipped-label term is *subtracted*, which makes the
    expected loss under label noise equal the clean DPO loss. ε = 0 is plain DPO.
    Implicit rewards: β (log πθ(c) − log πref(c)), likewise r.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing (the label flip rate) must be in [0, 0.5), got {label_smoothing}")
    logits = beta * ((policy_chosen - policy_rejected) - (reference_chosen - reference_rejected))
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return LossOutput(
        losses,
        implicit_reward_metrics(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected),
    )
