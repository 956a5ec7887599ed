"""Contrastive Preference Optimization (Xu et al. 2024), the "CPO" of TRL's CPOTrainer.

Not preftune's `cpo` (constrained DPO with a Lagrange multiplier, preftune/losses/cpo.py).
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput
from preftune.losses.dpo import dpo_loss


def contrastive_cpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    policy_chosen_mean: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Per-pair contrastive CPO loss from summed answer log-probs and the chosen per-token mean ([pairs] each); reference-free.

        h      = β · (log πθ(c) − log πθ(r))          summed answer log-probs
        pref   = −(1 − ε) · log σ(h) − ε · log σ(−h)   ε = `label_smoothing` (0 in the paper)
        nll    = −(log πθ(c)) / |c|                   per-token NLL of the chosen answer
        loss   = pref + α · nll                       α = `cpo_alpha` (1.0 in the paper and TRL)

    `pref` is the DPO loss with the reference log-ratio set to zero. TRL averages the NLL over all
    chosen tokens of a batch; here it is averaged per answer, then over pairs like every loss.
    Implicit rewards: β · log πθ(c) and β · log πθ(r).
    """
    no_reference = torch.zeros_like(policy_chosen)
    preference = dpo_loss(
        policy_chosen, policy_rejected, no_reference, no_reference, beta=beta, label_smoothing=label_smoothing
    )
    nll = -policy_chosen_mean
    return LossOutput(preference.losses + alpha * nll, {**preference.metrics, "nll/chosen": nll.detach()})
