"""SimPO (Meng et al. 2024): reference-free, length-normalised preference loss with a target margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, reward_metrics


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    sft_weight: float = 0.0,
) -> LossOutput:
    """Per-pair SimPO loss from per-token MEAN answer log-probs of the policy ([pairs] each).

        loss = −log σ(β · (avg log πθ(c) − avg log πθ(r)) − γ)  +  w · (−avg log πθ(c))

    γ = `gamma` is the target reward margin, w = `sft_weight` an optional SFT term on the chosen
    answer (0 in the paper; TRL calls the combination CPO-SimPO). No reference model.
    Implicit rewards: β · avg log πθ(c), β · avg log πθ(r).
    """
    chosen_rewards, rejected_rewards = beta * policy_chosen, beta * policy_rejected
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    metrics = reward_metrics(chosen_rewards, rejected_rewards)
    if sft_weight:
        nll = -policy_chosen
        losses = losses + sft_weight * nll
        metrics["nll/chosen"] = nll.detach()
    return LossOutput(losses, metrics)
