"""CPO = CONSTRAINED DPO: DPO + λ·relu(τ − margin), λ a Lagrange multiplier moved after each step.

Not TRL's CPO (Contrastive Preference Optimization): that is `contrastive_cpo`. See docs/CPO.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from preftune.control import Controller, LRReductionOnAlert
from preftune.losses import LossOutput
from preftune.losses.cpo import constrained_dpo_loss, margin_hinge
from preftune.methods.base import BetaSettings, Method, PairLogps, ProjectionSpec, ReportCurve
from preftune.methods.lagrangian import LagrangianController
from preftune.runfolder import RunRecords
from preftune.settings import Section


class ConstraintSettings(Section):
    """The margin constraint and its Lagrange multiplier λ; see docs/CPO.md."""

    margin_threshold: float = Field(
        0.01, description="τ: required policy-minus-reference log-prob margin per pair (per-token nats when length_normalize)"
    )
    temperature: float = Field(1.0, gt=0.0, description="τ is divided by this when temperature_scaled_threshold")
    temperature_scaled_threshold: bool = Field(True, description="divide margin_threshold by temperature")
    length_normalize: bool = Field(True, description="margin from per-token mean log-probs (false: sums)")
    mode: Literal["soft", "hard"] = Field(
        "hard", description="what λ tracks: soft = mean relu(τ − margin), hard = fraction of pairs with margin < τ"
    )
    lagrangian_lr: float = Field(0.5, ge=0.0, description="dual step size η: λ += η · (violation − constraint_slack)")
    initial_lambda: float = Field(0.0, ge=0.0, description="λ at the start (and at every epoch start, see reset_lambda_each_epoch)")
    lambda_max: float = Field(10.0, gt=0.0, description="upper clamp of λ")
    lambda_step_clip: float = Field(0.1, gt=0.0, description="largest change of λ in one step")
    constraint_slack: float = Field(
        0.05, ge=0.0, description="violation tolerated before λ rises; below it λ falls back toward 0"
    )
    reset_lambda_each_epoch: bool = Field(True, description="λ back to initial_lambda at the start of every epoch")
    violation_alert: float | None = Field(
        0.05, ge=0.0, le=1.0, description="validation fraction of pairs with margin < τ that counts as too high; null = off"
    )
    patience: int = Field(3, ge=1, description="evaluations in a row above violation_alert before the LR is lowered")
    lr_reduction: float = Field(0.2, gt=0.0, lt=1.0, description="fraction the learning rate is lowered by")
    # The epoch restart rule (docs/CPO.md, "Epoch restarts"), off with max_epoch_restarts: 0.
    max_epoch_restarts: int = Field(
        0, ge=0, description="epochs that may be rolled back and trained again per run, each with λ's step tightened; 0 = off"
    )
    restart_negative_margin_threshold: float = Field(
        0.15, ge=0.0, le=1.0,
        description="restart the epoch when more than this share of validation pairs has a negative per-token margin "
        "(eval/negative_margin_fraction_per_token) at its end; it also restarts when accuracy fell below the epoch's start",
    )
    restart_lambda_step_factor: float = Field(
        0.5, gt=0.0, le=1.0, description="lagrangian_lr and lambda_step_clip are multiplied by this at every epoch restart"
    )

    # --- chosen-likelihood anchor: a second constraint with its own multiplier μ (docs/CPO.md) ---
    chosen_anchor: bool = Field(
        False, description="add the constraint mean log πθ(chosen) ≥ mean log πref(chosen) − anchor_tolerance, with multiplier μ"
    )
    anchor_tolerance: float = Field(0.0, ge=0.0, description="per-token nats the chosen answer's mean log-prob may fall below the reference's")
    anchor_lr: float = Field(0.01, ge=0.0, description="μ's dual step size: μ += anchor_lr · (mean anchor hinge − anchor_slack)")
    anchor_slack: float = Field(
        0.001, ge=0.0, description="mean anchor hinge (per-token nats) tolerated before μ rises; below it μ falls back toward 0"
    )
    anchor_max: float = Field(10.0, gt=0.0, description="upper clamp of μ (its step is clipped by lambda_step_clip)")

    # --- λ warm-up ---
    lambda_warmup_steps: int = Field(
        0, ge=0, description="the λ handed to the loss is scaled from 0 to 1 over this many optimiser steps; 0 = off"
    )

    # --- projection step back toward the feasible region (docs/CPO.md) ---
    projection_steps: int = Field(
        0, ge=0, description="after each optimiser step, up to this many SGD steps on the batch's mean hinge alone; 0 = off"
    )
    projection_lr: float = Field(1e-3, gt=0.0, description="plain-SGD step size of the projection steps (not scheduled)")

    @model_validator(mode="after")
    def _lambda_in_range(self) -> ConstraintSettings:
        if self.initial_lambda > self.lambda_max:
            raise ValueError(f"initial_lambda ({self.initial_lambda}) must not exceed lambda_max ({self.lambda_max})")
        return self

    @property
    def threshold(self) -> float:
        """τ = margin_threshold, divided by temperature when `temperature_scaled_threshold`."""
        return self.margin_threshold / self.temperature if self.temperature_scaled_threshold else self.margin_threshold


class CPOSettings(BetaSettings):
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="ε of the DPO term (cDPO); 0 = plain DPO")
    constraints: ConstraintSettings = Field(
        default_factory=ConstraintSettings, description="the margin constraint and its Lagrange multiplier"
    )

    @model_validator(mode="before")
    @classmethod
    def _not_contrastive(cls, data: Any) -> Any:
        if isinstance(data, dict) and "cpo_alpha" in data:
            raise ValueError(
                "cpo_alpha belongs to CONTRASTIVE CPO (TRL's CPO, Xu et al. 2024), which is loss_type contrastive_cpo; "
                "preftune's loss_type cpo is CONSTRAINED DPO (docs/CPO.md) and has no NLL term: "
                "set loss_type: contrastive_cpo, or remove cpo_alpha"
            )
        if isinstance(data, dict) and data.get("constraints") is None:
            data = {**data, "constraints": {}}
        return data


def constraint_margin(policy: PairLogps, reference: PairLogps, *, length_normalize: bool):
    """m = (log πθ(c) − log πθ(r)) − (log πref(c) − log πref(r)) per pair ([pairs]); means or sums."""
    if length_normalize:
        return (policy.chosen.mean - policy.rejected.mean) - (reference.chosen.mean - reference.rejected.mean)
    return (policy.chosen.sum - policy.rejected.sum) - (reference.chosen.sum - reference.rejected.sum)


@dataclass(frozen=True)
class ConstrainedDPOLoss:
    settings: CPOSettings

    def __call__(
        self, policy: PairLogps, reference: PairLogps | None, *, lagrange_multiplier: float, anchor_multiplier: float = 0.0
    ) -> LossOutput:
        if reference is None:
            raise ValueError("constrained DPO needs reference log-probs")
        s = self.settings
        anchor = {}
        if s.constraints.chosen_anchor:
            anchor = {
                "chosen_logp_delta": policy.chosen.mean - reference.chosen.mean,
                "anchor_multiplier": anchor_multiplier,
                "anchor_tolerance": s.constraints.anchor_tolerance,
            }
        return constrained_dpo_loss(
            policy.chosen.sum, policy.rejected.sum, reference.chosen.sum, reference.rejected.sum,
            constraint_margin(policy, reference, length_normalize=s.constraints.length_normalize),
            beta=s.beta, lagrange_multiplier=lagrange_multiplier, threshold=s.constraints.threshold,
            label_smoothing=s.label_smoothing, **anchor,
        )


@dataclass(frozen=True)
class MarginConstraint:
    """The margin constraint m_i ≥ τ on its own, as CPO's projection step descends and tests it."""

    threshold: float
    length_normalize: bool

    def margin(self, policy: PairLogps, reference: PairLogps):
        return constraint_margin(policy, reference, length_normalize=self.length_normalize)

    def penalty(self, policy: PairLogps, reference: PairLogps):
        """relu(τ − m_i) ([pairs]): the violated-constraint term, no DPO term."""
        return margin_hinge(self.margin(policy, reference), self.threshold)

    def violated(self, policy: PairLogps, reference: PairLogps):
        """not m_i ≥ τ ([pairs] bool): m_i < τ, and a non-finite margin counts as violated."""
        return ~(self.margin(policy, reference) >= self.threshold)


def cpo_projection(settings: CPOSettings) -> ProjectionSpec | None:
    """`projection_steps` SGD steps of `projection_lr` on the batch's mean hinge after each optimiser step; None when 0."""
    constraints = settings.constraints
    if constraints.projection_steps == 0:
        return None
    constraint = MarginConstraint(constraints.threshold, constraints.length_normalize)
    return ProjectionSpec(
        steps=constraints.projection_steps, lr=constraints.projection_lr,
        penalty=constraint.penalty, violated=constraint.violated,
    )


def cpo_controllers(settings: CPOSettings) -> list[Controller]:
    """λ's dual step, and the learning-rate cut when validation keeps violating the constraint."""
    constraints = settings.constraints
    controllers: list[Controller] = [LagrangianController(constraints, threshold=constraints.threshold)]
    if constraints.violation_alert is not None:
        controllers.append(
            LRReductionOnAlert(
                name="constraint_violation_lr",
                metric="eval/constraint/violated",
                threshold=constraints.violation_alert,
                patience=constraints.patience,
                reduction=constraints.lr_reduction,
                description="validation pairs violating the CPO margin constraint (margin < τ)",
            )
        )
    return controllers


def cpo_report_section(records: RunRecords) -> tuple[str, list[str]] | None:
    """τ, what λ followed, where λ went, and how often the constraint was violated, from controllers.json."""
    state = records.controllers.get(LagrangianController.name)
    if not state:
        return None
    constraints = records.config.get("method", {}).get("constraints") or {}
    history = state.get("history", [])
    mode = constraints.get("mode", "soft")
    threshold = state.get("threshold")
    if threshold is None:  # a folder written before λ's state carried τ
        threshold = ConstraintSettings.model_validate(constraints).threshold
    lines = [
        f"- τ (effective margin threshold): {threshold:g} on the "
        f"{'per-token mean' if constraints.get('length_normalize', True) else 'summed'} log-prob margin; "
        f"λ follows the {'mean hinge' if mode == 'soft' else 'fraction of pairs below τ'} ({mode} mode)",
        f"- λ at the end: {state['lambda']:.4g}",
    ]
    if history:
        peak = max(history, key=lambda entry: entry["lambda"])
        slack = constraints.get("constraint_slack", 0.0)
        lines += [
            f"- λ peaked at {peak['lambda']:.4g} after step {peak['step']}; last step's violation {history[-1]['violation']:.4g}",
            f"- steps whose violation exceeded the slack {slack:g}: {sum(e['violation'] > slack for e in history)} of {len(history)}",
        ]
        if max(entry["lambda"] for entry in history) == 0.0:
            lines.append(
                f"- **the constraint never acted**: λ stayed 0 because the step's violation never exceeded constraint_slack "
                f"({slack:g}); this run trained as plain DPO"
            )
    if "anchor_multiplier" in state:
        anchored = [entry for entry in history if "anchor_multiplier" in entry]
        peak_mu = max((entry["anchor_multiplier"] for entry in anchored), default=0.0)
        lines.append(
            f"- chosen-likelihood anchor (tolerance {constraints.get('anchor_tolerance', 0.0):g} nats/token): "
            f"μ at the end {state['anchor_multiplier']:.4g}, peak {peak_mu:.4g}"
        )
    projected = [row for row in records.train_rows if "projection/steps_taken" in row]
    if projected:
        taken = sum(row["projection/steps_taken"] for row in projected)
        feasible = sum(row["projection/violated_after"] == 0.0 for row in projected)
        lines.append(
            f"- projection: {taken:g} extra step(s) over {len(projected)} logged steps; the batch was feasible after it "
            f"in {feasible} of them (mean share of pairs below τ {_mean(projected, 'projection/violated_before'):.3g} before → "
            f"{_mean(projected, 'projection/violated_after'):.3g} after)"
        )
    if state.get("epoch_restarts"):
        lines.append(
            f"- epochs restarted: {state['epoch_restarts']} (the `epoch_restart` alerts say why); λ's step since: "
            f"{state['step_scale']:g} × lagrangian_lr and lambda_step_clip"
        )
    cuts = records.controllers.get("constraint_violation_lr", {}).get("reductions", [])
    if cuts:
        lines.append(f"- learning rate cut {len(cuts)} time(s) for sustained violation (now {cuts[-1]['lr_scale']:.3g} × the schedule)")
    lines += [
        "- the step loss is the preference (DPO) loss + λ · mean hinge: drawn apart below, because λ grows while "
        "the constraint is violated; `final/lagrangian_state.json` holds λ after every step",
    ]
    return "CPO constraint (constrained DPO)", lines


def _mean(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)


METHOD = Method(
    name="cpo",
    aliases=("constrained_dpo",),
    summary=(
        "CONSTRAINED DPO: DPO + λ·relu(τ − margin), λ a Lagrange multiplier updated after each step "
        "(settings: method.constraints; docs/CPO.md). Not TRL's contrastive CPO: that is contrastive_cpo"
    ),
    settings=CPOSettings,
    build_loss=ConstrainedDPOLoss,
    controllers=cpo_controllers,
    projection=cpo_projection,
    report_section=cpo_report_section,
    report_curves=(
        ReportCurve("preference (DPO) loss and the whole step loss", ("loss/preference", "loss")),
        ReportCurve("λ and the violation it follows", ("lagrangian/lambda", "lagrangian/violation")),
        ReportCurve("anchor multiplier μ and the chosen answers' per-token log-prob change", ("lagrangian/anchor_multiplier", "constraint/chosen_logp_delta")),
        ReportCurve("projection: share of the batch's pairs below τ", ("projection/violated_before", "projection/violated_after")),
    ),
)
