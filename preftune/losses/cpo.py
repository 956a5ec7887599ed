"""CPO = *constrained* preference optimisation: DPO plus a margin constraint enforced by a Lagrange multiplier.

Not TRL's "CPO" (Contrastive Preference Optimization, Xu et al. 2024): that one is
`contrastive_cpo_loss` (preftune/losses/contrastive_cpo.py). See docs/CPO.md.

The formula here is a pure function of log-probs and a given multiplier λ. λ is not a trainable
weight: the method's Lagrangian controller (preftune/methods/lagrangian.py) moves it by a dual step
after every optimiser step and the loop passes it to the loss as an argument.
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput
from preftune.losses.dpo import dpo_loss


def constrained_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    constraint_margin: torch.Tensor,
    *,
    beta: float,
    lagrange_multiplier: float,
    threshold: float,
    label_smoothing: float = 0.0,
    chosen_logp_delta: torch.Tensor | None = None,
    anchor_multiplier: float = 0.0,
    anchor_tolerance: float = 0.0,
) -> LossOutput:
    """Per-pair constrained DPO loss ([pairs] each; the four log-probs are answer sums).

        dpo_i    = DPO loss of pair i (summed answer log-probs, β, label smoothing; see dpo.py)
        m_i      = `constraint_margin`: (log πθ(c) − log πθ(r)) − (log πref(c) − log πref(r)),
                   from per-token mean log-probs when the method length-normalises, sums otherwise
        hinge_i  = relu(τ − m_i)                   τ = `threshold` (already temperature-scaled)
        loss_i   = dpo_i + λ · hinge_i             λ = `lagrange_multiplier`, a constant here

    The trainer averages loss_i over the pairs of a step, so the step loss is
    DPO loss + λ · mean(hinge). λ enters as a Python float, so no gradient can reach it.
    Each violating pair (m_i < τ) pays λ · (τ − m_i), a satisfied pair nothing.

    Chosen-likelihood anchor (only when `chosen_logp_delta` is given; DPO-Positive / Smaug, Pal et
    al. 2024, arXiv 2402.13228, as a constraint with its own multiplier instead of a fixed weight):

        δ_i        = `chosen_logp_delta`: mean log πθ(c) − mean log πref(c) (per-token means)
        anchor_i   = relu(−δ_i − tol)              tol = `anchor_tolerance`
        loss_i    += μ · anchor_i                  μ = `anchor_multiplier`, a constant here

    i.e. the constraint "mean log πθ(c) ≥ mean log πref(c) − tol"; metrics `constraint/anchor_hinge`
    (anchor_i), `constraint/anchor_violated` (1 if δ_i < −tol) and `constraint/chosen_logp_delta` (δ_i).

    Metrics per pair: `constraint/margin` (m_i), `constraint/hinge` (hinge_i),
    `constraint/violated` (1 if m_i < τ), `loss/preference` (dpo_i), plus DPO's reward metrics.
    """
    preference = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta, label_smoothing=label_smoothing
    )
    hinge = margin_hinge(constraint_margin, threshold)
    multiplier = float(torch.as_tensor(lagrange_multiplier).detach())  # a plain number: λ is a constant of this loss
    losses = preference.losses + multiplier * hinge
    metrics = {
        **preference.metrics,
        "loss/preference": preference.losses.detach(),
        "constraint/margin": constraint_margin.detach(),
        "constraint/hinge": hinge.detach(),
        "constraint/violated": (constraint_margin < threshold).float().detach(),
    }
    if chosen_logp_delta is not None:
        anchor = torch.relu(-chosen_logp_delta - anchor_tolerance)
        losses = losses + float(torch.as_tensor(anchor_multiplier).detach()) * anchor
        metrics.update(
            {
                "constraint/anchor_hinge": anchor.detach(),
                "constraint/anchor_violated": (chosen_logp_delta < -anchor_tolerance).float().detach(),
                "constraint/chosen_logp_delta": chosen_logp_delta.detach(),
            }
        )
    return LossOutput(losses, metrics)


def margin_hinge(constraint_margin: torch.Tensor, threshold: float) -> torch.Tensor:
    """hinge_i = relu(τ − m_i) ([pairs]): how far pair i's constraint margin is below τ; 0 when it meets it.

    The violated-constraint term alone: the constrained DPO loss charges λ · hinge_i, and CPO's
    projection step descends the mean of hinge_i over a batch (docs/CPO.md).
    """
    return torch.relu(threshold - constraint_margin)
