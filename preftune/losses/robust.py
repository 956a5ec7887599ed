"""Robust DPO (Chowdhury et al. 2024): an unbiased DPO loss when a known fraction of labels is flipped."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, LossSpec, PairLogps, reward_metrics


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
        reward_metrics(beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)),
    )


class RobustDPOLoss:
    def __init__(self, method):
        self.beta = method.beta
        self.label_smoothing = method.label_smoothing

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        assert reference is not None, "robust DPO needs reference log-probs"
        return robust_dpo_loss(
            policy.chosen.sum,
            policy.rejected.sum,
            reference.chosen.sum,
            reference.rejected.sum,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
        )


SPEC = LossSpec(
    name="robust",
    build=RobustDPOLoss,
    needs_reference=True,
    summary="robust DPO for noisy labels: unbiased under a label flip rate ε = label_smoothing",
)
