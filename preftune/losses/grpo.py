"""GRPO's clipped surrogate with a k3 KL penalty to the reference (Shao et al. 2024, DeepSeekMath),
with DAPO's decoupled clip range ("clip-higher", Yu et al. 2025) and the GRPO / DAPO / Dr. GRPO
loss aggregations (`preftune.losses.aggregation`).

A pure function of per-token log-probs; the advantages come from
`preftune.online.advantages.group_advantages`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.losses.aggregation import AggregatedLoss, Aggregation, aggregate_token_losses, masked_mean


@dataclass
class GRPOLossOutput:
    """The aggregated loss, the per-token loss it came from, and scalar metrics (token means under the mask)."""

    loss: AggregatedLoss
    per_token: torch.Tensor  # [sequences, tokens]
    metrics: dict[str, torch.Tensor]


def k3_kl(logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(πθ ‖ πref) (Schulman 2020): exp(ref − logp) − (ref − logp) − 1 ≥ 0, exactly 0 when equal."""
    log_ratio = reference_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    reference_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: Aggregation = "sequence",
    max_completion_length: int | None = None,
) -> GRPOLossOutput:
    """GRPO loss from per-token log-probs (`logps, old_logps, reference_logps, mask: [sequences, tokens]`).

        ρ_t   = exp(log πθ(o_t) − log πold(o_t))
        s_t   = min(ρ_t · A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) · A_i)
        KL_t  = exp(log πref − log πθ) − (log πref − log πθ) − 1          (k3, ≥ 0)
        ℓ_t   = −s_t + β · KL_t

    then reduced by `aggregation` ("sequence" = GRPO, "token" = DAPO, "dr_grpo" = Dr. GRPO).

    `advantages` is per sequence (`[sequences]`, broadcast over its tokens) or per token.
    `old_logps=None` means one update per generation batch: πold = πθ detached, so ρ = 1 and the
    gradient is A · ∇log πθ. `epsilon_high=None` is symmetric clipping (ε_high = ε_low); DAPO uses
    ε_low = 0.2, ε_high = 0.28. β = 0 drops the KL term and needs no reference log-probs.

    Metrics: `kl` (mean KL_t, when β > 0), `clip_ratio/low` and `clip_ratio/high` (fraction of tokens
    whose clipped side was taken: ρ < 1 − ε_low with A < 0, ρ > 1 + ε_high with A > 0),
    `clip_ratio/region` (their sum), `ratio` (mean ρ).
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if beta < 0 or epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"beta, epsilon_low and epsilon_high must be >= 0, got {beta}, {epsilon_low}, {epsilon_high}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if old_logps is None:
        old_logps = logps.detach()
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    surrogate = torch.min(ratio * advantages, clipped_ratio * advantages)
    per_token = -surrogate

    metrics: dict[str, torch.Tensor] = {}
    if beta > 0:
        if reference_logps is None:
            raise ValueError("beta > 0 needs reference_logps for the KL penalty")
        kl = k3_kl(logps, reference_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)

    advantages = advantages.expand_as(ratio).detach()
    clipped_low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
    clipped_high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
    metrics["clip_ratio/low"] = masked_mean(clipped_low, mask)
    metrics["clip_ratio/high"] = masked_mean(clipped_high, mask)
    metrics["clip_ratio/region"] = metrics["clip_ratio/low"] + metrics["clip_ratio/high"]
    metrics["ratio"] = masked_mean(ratio.detach(), mask)

    loss = aggregate_token_losses(per_token, mask, aggregation, max_completion_length=max_completion_length)
    return GRPOLossOutput(loss, per_token, metrics)
