"""PPO's clipped objectives (Schulman et al. 2017) as used for RLHF (Ziegler et al. 2019;
Ouyang et al. 2022): clipped policy loss, clipped value loss, entropy bonus, and their metrics.

All inputs are per token (`[sequences, tokens]`) with a `mask` of the completion tokens; every
reduction is the token mean under the mask (`preftune.losses.aggregation.masked_mean`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.losses.aggregation import masked_mean


@dataclass
class PPOLossOutput:
    """`loss` = policy + value_coef · value − entropy_coef · entropy, its parts, and scalar metrics."""

    loss: torch.Tensor  # []
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]


def ppo_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, clip_range: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, token mean:

        ρ_t = exp(log πθ − log πold)
        L   = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    Metrics: `policy/clip_fraction` = fraction of tokens where the clipped term is the larger
    (strictly), i.e. where the gradient is cut; `policy/approx_kl` = mean_t (ρ_t − 1) − log ρ_t,
    the k3 estimate of KL(πold ‖ πθ) (≥ 0, 0 when nothing moved).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    metrics = {
        "policy/clip_fraction": masked_mean((clipped > unclipped).float(), mask),
        "policy/approx_kl": masked_mean(((ratio - 1) - log_ratio).detach(), mask),
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip_range: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, token mean:

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L      = ½ · mean_t max((V − R)², (V_clip − R)²)

    Metric `value/clip_fraction`: fraction of tokens where the clipped error is strictly larger.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, {"value/clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask)}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) over the last axis: H = logsumexp(z) − Σ softmax(z) · z."""
    probabilities = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probabilities * logits).sum(dim=-1)


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    clip_range: float = 0.2,
    value_clip_range: float = 0.2,
    value_coef: float = 0.1,
    entropy_coef: float = 0.0,
) -> PPOLossOutput:
    """loss = L_policy + c_v · L_value − c_e · mean_t H_t.

    `entropy` is per token (`entropy_from_logits`); None with c_e = 0 skips the bonus.
    Advantages are taken as given (whiten them first with `preftune.online.advantages.whiten`).
    Extra metric `value/explained_variance` (see `explained_variance`).
    """
    policy_loss, metrics = ppo_policy_loss(logps, old_logps, advantages.detach(), mask, clip_range=clip_range)
    value_loss, value_metrics = ppo_value_loss(values, old_values, returns.detach(), mask, clip_range=value_clip_range)
    metrics.update(value_metrics)
    if entropy is None:
        if entropy_coef != 0:
            raise ValueError("entropy_coef != 0 needs the per-token entropy")
        mean_entropy = torch.zeros((), device=logps.device)
    else:
        mean_entropy = masked_mean(entropy, mask)
        metrics["entropy"] = mean_entropy.detach()
    metrics["value/explained_variance"] = explained_variance(values.detach(), returns.detach(), mask)
    loss = policy_loss + value_coef * value_loss - entropy_coef * mean_entropy
    return PPOLossOutput(loss, policy_loss, value_loss, mean_entropy, metrics)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the masked tokens (population variances): 1 = perfect values,
    0 = no better than predicting the mean, < 0 = worse. NaN when the returns do not vary."""
    residual_mean = masked_mean(returns - values, mask)
    residual_variance = masked_mean((returns - values - residual_mean) ** 2, mask)
    returns_mean = masked_mean(returns, mask)
    returns_variance = masked_mean((returns - returns_mean) ** 2, mask)
    return 1 - residual_variance / returns_variance
