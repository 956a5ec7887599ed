"""CPO = *constrained* preference optimisation: DPO plus a margin constraint enforced by a Lagrange multiplier.

Not TRL's "CPO" (Contrastive Preference Optimization, Xu et al. 2024): that one is
`loss_type: contrastive_cpo` (preftune/losses/contrastive_cpo.py). See docs/CPO.md.

The loss here is a pure function of log-probs and a given multiplier λ. λ itself is not a
trainable weight: `preftune.train.lagrangian.LagrangianController` moves it by a dual step
after every optimiser step and writes it into `ConstrainedDPOLoss.lagrange_multiplier`.
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, LossSpec, PairLogps
from preftune.losses.dpo import dpo_loss


def constrained_dpo_loss(
    policy: PairLogps,
    reference: PairLogps,
    *,
    beta: float,
    lagrange_multiplier: float,
    threshold: float,
    length_normalize: bool = True,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Per-pair constrained DPO loss ([pairs]).

        dpo_i    = DPO loss of pair i (summed answer log-probs, β, label smoothing; see dpo.py)
        m_i      = (log πθ(c) − log πθ(r)) − (log πref(c) − log πref(r))
                   with per-token mean log-probs when `length_normalize`, sums otherwise
        hinge_i  = relu(τ − m_i)                   τ = `threshold` (already temperature-scaled)
        loss_i   = dpo_i + λ · hinge_i             λ = `lagrange_multiplier`, a constant here

    The trainer averages loss_i over the pairs of a step, so the step loss is
    DPO loss + λ · mean(hinge). λ enters as a Python float, so no gradient can reach it.
    The penalty is the same in both `constraints.mode`s: each violating pair (m_i < τ) pays
    λ · (τ − m_i), a satisfied pair nothing. The mode only sets what λ follows (lagrangian.py):
    soft = mean(hinge), hard = the fraction of violating pairs.

    Metrics per pair: `constraint/margin` (m_i), `constraint/hinge` (hinge_i),
    `constraint/violated` (1 if m_i < τ), plus DPO's reward metrics.
    """
    preference = dpo_loss(
        policy.chosen.sum,
        policy.rejected.sum,
        reference.chosen.sum,
        reference.rejected.sum,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    margin = constraint_margin(policy, reference, length_normalize=length_normalize)
    hinge = torch.relu(threshold - margin)
    multiplier = float(torch.as_tensor(lagrange_multiplier).detach())  # a plain number: λ is a constant of this loss
    losses = preference.losses + multiplier * hinge
    metrics = {
        **preference.metrics,
        "constraint/margin": margin.detach(),
        "constraint/hinge": hinge.detach(),
        "constraint/violated": (margin < threshold).float().detach(),
    }
    return LossOutput(losses, metrics)


def constraint_margin(policy: PairLogps, reference: PairLogps, *, length_normalize: bool) -> torch.Tensor:
    """m = (log πθ(c) − log πθ(r)) − (log πref(c) − log πref(r)) per pair ([pairs]); means or sums."""
    if length_normalize:
        return (policy.chosen.mean - policy.rejected.mean) - (reference.chosen.mean - reference.rejected.mean)
    return (policy.chosen.sum - policy.rejected.sum) - (reference.chosen.sum - reference.rejected.sum)


def effective_threshold(constraints) -> float:
    """τ = margin_threshold, divided by temperature when `temperature_scaled_threshold`."""
    if constraints.temperature_scaled_threshold:
        return constraints.margin_threshold / constraints.temperature
    return constraints.margin_threshold


class ConstrainedDPOLoss:
    """The loss with its current λ (set by the Lagrangian controller; starts at `initial_lambda`)."""

    def __init__(self, method):
        self.beta = method.beta
        self.label_smoothing = method.label_smoothing
        self.constraints = method.constraints
        self.threshold = effective_threshold(method.constraints)
        self.lagrange_multiplier = float(method.constraints.initial_lambda)

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        assert reference is not None, "constrained DPO needs reference log-probs"
        return constrained_dpo_loss(
            policy,
            reference,
            beta=self.beta,
            lagrange_multiplier=self.lagrange_multiplier,
            threshold=self.threshold,
            length_normalize=self.constraints.length_normalize,
            label_smoothing=self.label_smoothing,
        )


def _controllers(loss: ConstrainedDPOLoss, method) -> list:
    from preftune.train.lagrangian import cpo_controllers  # train/ imports losses/, not the other way at import time

    return cpo_controllers(loss, method.constraints)


SPEC = LossSpec(
    name="cpo",
    build=ConstrainedDPOLoss,
    needs_reference=True,
    summary=(
        "CONSTRAINED DPO: DPO + λ·relu(τ − margin), λ a Lagrange multiplier updated after each step "
        "(settings: method.constraints; docs/CPO.md). Not TRL's contrastive CPO: that is contrastive_cpo"
    ),
    controllers=_controllers,
)
