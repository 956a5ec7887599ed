"""ORPO (Hong et al. 2024): reference-free SFT plus an odds-ratio preference term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, reward_metrics

LOG_HALF = -0.6931471805599453  # log(1/2), where log1mexp switches formula


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate over the whole range and finite at x = 0.

    Mächler's split: log(−expm1(x)) near 0, log1p(−eˣ) further out; each avoids the cancellation
    of the other. x is clamped just below 0 so an answer with probability 1 (a per-token mean
    log-prob of exactly 0) gives a large finite value instead of −∞ (and NaN log-odds).
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *, beta: float) -> LossOutput:
    """Per-pair ORPO loss from per-token MEAN answer log-probs of the policy ([pairs] each).

        odds(y)   = p(y) / (1 − p(y)),  log odds(y) = log p(y) − log(1 − p(y))   (log1mexp)
        log_odds  = log odds(c) − log odds(r)
        loss      = −avg log πθ(c)  −  λ · log σ(log_odds)          λ = `beta` (TRL's name)

    p(y) is the per-token geometric-mean probability exp(avg log πθ(y)), as in the paper and TRL.
    No reference model. Implicit rewards: β · avg log πθ(c), β · avg log πθ(r).
    """
    log_odds = (policy_chosen - log1mexp(policy_chosen)) - (policy_rejected - log1mexp(policy_rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -policy_chosen
    metrics = reward_metrics(beta * policy_chosen, beta * policy_rejected)
    metrics.update({"orpo/log_odds_ratio": ratio.detach(), "orpo/log_odds": log_odds.detach(), "nll/chosen": nll.detach()})
    return LossOutput(nll - beta * ratio, metrics)
