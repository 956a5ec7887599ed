"""Masked reductions of per-token losses, shared by the online losses (GRPO, PPO).

Every reduction is returned as a numerator and a denominator, so a step split into micro-batches
can sum both over its micro-batches and divide once: the result equals the full-batch value for
every mode (an average of per-micro-batch averages would not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["sequence", "token", "dr_grpo"]
AGGREGATIONS: tuple[str, ...] = ("sequence", "token", "dr_grpo")


@dataclass
class AggregatedLoss:
    """`value = numerator / denominator`; sum both over micro-batches before dividing to keep accumulation exact."""

    numerator: torch.Tensor  # [] carries the gradient
    denominator: float

    @property
    def value(self) -> torch.Tensor:
        return self.numerator / self.denominator


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ values · mask over `dim` (all elements when None)."""
    masked = values * mask.to(values.dtype)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ values · mask / Σ mask over `dim`; a row with no unmasked element gives 0, not NaN."""
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def aggregate_token_losses(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation,
    *,
    max_completion_length: int | None = None,
) -> AggregatedLoss:
    """Reduce per-token losses `per_token: [sequences, tokens]` under `mask: [sequences, tokens]` to one number.

        sequence  (GRPO, Shao et al. 2024):   (1/G) Σ_i (1/|o_i|) Σ_t ℓ_i,t
        token     (DAPO, Yu et al. 2025):     Σ_i Σ_t ℓ_i,t / Σ_i |o_i|
        dr_grpo   (Dr. GRPO, Liu et al. 2025): Σ_i Σ_t ℓ_i,t / (G · L)

    G = number of sequences, |o_i| = unmasked tokens of sequence i, L = `max_completion_length`
    (a constant, so a sequence's weight does not depend on its own length; defaults to the
    padded width `per_token.shape[1]`, but pass the generation limit to keep it fixed across batches).
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(f"per_token and mask must both be [sequences, tokens], got {tuple(per_token.shape)} and {tuple(mask.shape)}")
    sequences = per_token.shape[0]
    if mode == "sequence":
        return AggregatedLoss(masked_mean(per_token, mask, dim=1).sum(), float(sequences))
    if mode == "token":
        return AggregatedLoss(masked_sum(per_token, mask), float(mask.sum().clamp(min=1).item()))
    if mode == "dr_grpo":
        length = per_token.shape[1] if max_completion_length is None else max_completion_length
        return AggregatedLoss(masked_sum(per_token, mask), float(sequences * length))
    raise ValueError(f"unknown loss aggregation {mode!r}: use one of {', '.join(AGGREGATIONS)}")
