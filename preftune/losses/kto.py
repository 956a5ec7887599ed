"""KTO (Ethayarajh et al. 2024): prospect-theoretic loss on unpaired desirable / undesirable completions."""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput


def kto_loss(
    policy_completion: torch.Tensor,
    policy_mismatched: torch.Tensor,
    reference_completion: torch.Tensor,
    reference_mismatched: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Per-example KTO loss from summed answer log-probs ([examples] each; `desirable`: bool).

        r_i    = log πθ(y_i | x_i) − log πref(y_i | x_i)
        z_ref  = max(0, mean_j [log πθ(y'_j | x_j) − log πref(y'_j | x_j)])      no gradient
        loss_i = λ_D · (1 − σ(β (r_i − z_ref)))    if y_i is desirable
                 λ_U · (1 − σ(β (z_ref − r_i)))    if y_i is undesirable

    y'_j is another example's completion under x_j's prompt, so z_ref estimates the KL between
    policy and reference on the batch, as in the paper and TRL: detached and clamped at 0.
    λ_D = `desirable_weight`, λ_U = `undesirable_weight`; the paper keeps λ_D·n_D / (λ_U·n_U) in
    [1, 4/3]. The batch may hold one kind of label only.

    Metrics per example: `kl` (z_ref), `rewards/implicit` (β r_i), `rewards/margins` (β r_i for a
    desirable, −β r_i for an undesirable completion: how far the policy moved it the right way
    from the reference) and `rewards/accuracies` (that margin > 0).
    """
    log_ratio = policy_completion - reference_completion
    kl = (policy_mismatched - reference_mismatched).mean().clamp(min=0).detach()
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = (beta * log_ratio).detach()
    signed = torch.where(desirable, rewards, -rewards)
    return LossOutput(
        losses,
        {
            "kl": kl.expand_as(rewards),
            "rewards/implicit": rewards,
            "rewards/margins": signed,
            "rewards/accuracies": (signed > 0).float(),
        },
    )
