"""Contrastive Preference Optimization (Xu et al. 2024), the "CPO" of TRL's CPOTrainer.

Not preftune's `cpo` (constrained DPO with a Lagrange multiplier, preftune/losses/cpo.py).
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, LossSpec, PairLogps
from preftune.losses.dpo import dpo_loss


def contrastive_cpo_loss(
    policy: PairLogps,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Per-pair contrastive CPO loss ([pairs]); reference-free.

        h      = β · (log πθ(c) − log πθ(r))          summed answer log-probs
        pref   = −(1 − ε) · log σ(h) − ε · log σ(−h)   ε = `label_smoothing` (0 in the paper)
        nll    = −(log πθ(c)) / |c|                   per-token NLL of the chosen answer
        loss   = pref + α · nll                       α = `cpo_alpha` (1.0 in the paper and TRL)

    `pref` is the DPO loss with the reference log-ratio set to zero. TRL averages the NLL over all
    chosen tokens of a batch; here it is averaged per answer, then over pairs like every loss.
    Implicit rewards: β · log πθ(c) and β · log πθ(r).
    """
    no_reference = torch.zeros_like(policy.chosen.sum)
    preference = dpo_loss(
        policy.chosen.sum, policy.rejected.sum, no_reference, no_reference, beta=beta, label_smoothing=label_smoothing
    )
    nll = -policy.chosen.mean
    return LossOutput(preference.losses + alpha * nll, {**preference.metrics, "nll/chosen": nll.detach()})


class ContrastiveCPOLoss:
    def __init__(self, method):
        self.beta = method.beta
        self.alpha = method.cpo_alpha
        self.label_smoothing = method.label_smoothing

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        return contrastive_cpo_loss(policy, beta=self.beta, alpha=self.alpha, label_smoothing=self.label_smoothing)


SPEC = LossSpec(
    name="contrastive_cpo",
    build=ContrastiveCPOLoss,
    needs_reference=False,
    summary=(
        "CONTRASTIVE CPO (Xu et al. 2024; TRL's CPOTrainer): reference-free -log σ(β(log πθ(c) − log πθ(r))) "
        "+ cpo_alpha · NLL(chosen). Not preftune's constrained cpo"
    ),
)
