"""DPO, sigmoid form (Rafailov et al. 2023), with conservative label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, implicit_reward_metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Per-pair DPO loss from summed answer log-probs ([pairs] each).

        h    = β · [(log πθ(c) − log πθ(r)) − (log πref(c) − log πref(r))]
        loss = −(1 − ε) · log σ(h) − ε · log σ(−h)

    ε = `label_smoothing` is the assumed rate of flipped labels (cDPO); ε = 0 is plain DPO.
    Implicit rewards: r(c) = β (log πθ(c) − log πref(c)), likewise r(r).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = beta * ((policy_chosen - policy_rejected) - (reference_chosen - reference_rejected))
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(
        losses,
        implicit_reward_metrics(beta, policy_chosen, policy_rejected, reference_chosen, reference_rejected),
    )
