"""CPO's Lagrange multiplier λ: a dual-ascent step after every optimiser step, never a trainable weight.

    λ ← clamp(λ + clip(η · (v − slack), ±lambda_step_clip), 0, lambda_max)

η = `lagrangian_lr`; v = the step's constraint violation, averaged over every pair of the step:
the mean hinge relu(τ − margin) in `soft` mode, the fraction of pairs with margin < τ in `hard`
mode. λ rises while the constraint is violated more than `constraint_slack` and falls back
toward 0 once it holds. The loss receives λ as an argument (`loss_inputs`), a constant to autograd.
In both modes the loss penalises each violating pair by λ·(τ − margin) (preftune/losses/cpo.py);
the mode only changes the quantity λ follows.

With `chosen_anchor`, the controller also owns μ, the multiplier of the chosen-likelihood anchor
(preftune/losses/cpo.py), moved by the same kind of step on the mean anchor hinge:

    μ ← clamp(μ + clip(anchor_lr · (a − anchor_slack), ±lambda_step_clip), 0, anchor_max)

With `lambda_warmup_steps` N > 0, the loss of the step after k completed steps receives
λ · min(1, k / N): 0 on the first step, the full λ from step N + 1 on. The dual variable itself
moves as without the warm-up; only what the loss is handed is scaled.

The epoch restart rule (off unless `max_epoch_restarts` > 0; docs/CPO.md): at the evaluation that
closes an epoch, when validation preference accuracy fell below the evaluation at the epoch's
start, or the share of pairs with a negative per-token margin exceeds
`restart_negative_margin_threshold`, the controller asks the loop to restart the epoch; on the
restart it multiplies η and `lambda_step_clip` by `restart_lambda_step_factor` (`step_scale`,
controller state, so a resume keeps the tightened step) for the rest of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.atomic import atomic_write_json
from preftune.control import Controller, StepContext

MONITORED_METRIC = {"soft": "constraint/hinge", "hard": "constraint/violated"}
ANCHOR_METRIC = "constraint/anchor_hinge"
STATE_FILE = "lagrangian_state.json"


ACCURACY_METRIC = "eval/rewards/accuracies"
NEGATIVE_MARGIN_METRIC = "eval/negative_margin_fraction_per_token"  # the length-normalised margin, the design's definition


def projected_dual_step(multiplier: float, violation: float, *, lr: float, slack: float, step_clip: float, maximum: float) -> float:
    """clamp(multiplier + clip(lr · (violation − slack), ±step_clip), 0, maximum)."""
    step = max(-step_clip, min(step_clip, lr * (violation - slack)))
    return max(0.0, min(maximum, multiplier + step))


def dual_step(multiplier: float, violation: float, settings, *, step_scale: float = 1.0) -> float:
    """One projected, clipped dual-ascent step on λ (see the module docstring); `step_scale` multiplies
    both η and the clip (the epoch restart rule's tightening)."""
    return projected_dual_step(
        multiplier, violation, lr=step_scale * settings.lagrangian_lr, slack=settings.constraint_slack,
        step_clip=step_scale * settings.lambda_step_clip, maximum=settings.lambda_max,
    )


def anchor_dual_step(multiplier: float, violation: float, settings, *, step_scale: float = 1.0) -> float:
    """The same step on the anchor's multiplier μ, with its own rate, slack and maximum (tightened alike)."""
    return projected_dual_step(
        multiplier, violation, lr=step_scale * settings.anchor_lr, slack=settings.anchor_slack,
        step_clip=step_scale * settings.lambda_step_clip, maximum=settings.anchor_max,
    )


def warmup_scale(steps_done: int, warmup_steps: int) -> float:
    """min(1, steps_done / warmup_steps); 1 when the warm-up is off (0 steps)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, steps_done / warmup_steps)


class LagrangianController(Controller):
    """Owns λ (and μ with the anchor) and their history; hands them to the loss through `loss_inputs()`."""

    name = "lagrangian"

    def __init__(self, settings, *, threshold: float):
        self.settings = settings
        self.threshold = threshold
        self.monitored = MONITORED_METRIC[settings.mode]
        self.history: list[dict[str, float]] = []  # one entry per optimiser step
        self.multiplier = float(settings.initial_lambda)
        self.anchor = settings.chosen_anchor
        self.anchor_multiplier = 0.0  # μ; moves only with chosen_anchor
        self.steps_done = 0  # optimiser steps completed: what the λ warm-up counts
        self.inactive_alerted = False
        # The epoch restart rule's state.
        self.step_scale = 1.0  # × lagrangian_lr and × lambda_step_clip; lowered at every epoch restart
        self.epoch_restarts = 0
        self.last_evaluation: dict[str, float] = {}  # accuracy and negative-margin share of the latest evaluation
        self.epoch_baseline: float | None = None  # accuracy at the current epoch's start

    @property
    def may_request_epoch_restart(self) -> bool:
        return self.epoch_restarts < self.settings.max_epoch_restarts

    @property
    def lambda_scale(self) -> float:
        return warmup_scale(self.steps_done, self.settings.lambda_warmup_steps)

    def loss_inputs(self) -> dict[str, Any]:
        inputs: dict[str, Any] = {"lagrange_multiplier": self.multiplier * self.lambda_scale}
        if self.anchor:
            inputs["anchor_multiplier"] = self.anchor_multiplier
        return inputs

    def on_train_start(self, context: StepContext) -> None:
        self.steps_done = context.step

    def on_epoch_start(self, context: StepContext) -> dict[str, float]:
        metrics = {}
        if self.settings.reset_lambda_each_epoch:
            self.multiplier = float(self.settings.initial_lambda)
            self.anchor_multiplier = 0.0
        self.epoch_baseline = self.last_evaluation.get(ACCURACY_METRIC)
        if self.anchor:
            metrics["lagrangian/anchor_multiplier"] = self.anchor_multiplier
        return {"lagrangian/lambda": self.multiplier, **metrics}

    def on_step_end(self, context: StepContext) -> dict[str, float]:
        # `metrics` are means over every pair of the step (all micro-batches and processes), so every
        # process takes the same step.
        violation = context.metrics[self.monitored]
        used = self.multiplier
        scale = self.lambda_scale
        self.multiplier = dual_step(used, violation, self.settings, step_scale=self.step_scale)
        self.steps_done = context.step
        entry = {
            "step": context.step,
            "epoch": context.metrics["epoch"],
            "violation": violation,
            "lambda_used": used,  # λ (the dual variable) when the step's loss was computed
            "lambda": self.multiplier,  # λ after the dual step, used by the next step
        }
        metrics = {"lagrangian/lambda": self.multiplier, "lagrangian/violation": violation}
        if self.settings.lambda_warmup_steps > 0:
            entry["lambda_scale"] = scale  # the step's loss received lambda_used · lambda_scale
            metrics["lagrangian/lambda_scale"] = scale
        if self.anchor:
            anchor_violation = context.metrics[ANCHOR_METRIC]
            entry["anchor_violation"] = anchor_violation
            entry["anchor_multiplier_used"] = self.anchor_multiplier
            self.anchor_multiplier = anchor_dual_step(self.anchor_multiplier, anchor_violation, self.settings, step_scale=self.step_scale)
            entry["anchor_multiplier"] = self.anchor_multiplier
            metrics["lagrangian/anchor_multiplier"] = self.anchor_multiplier
        self.history.append(entry)
        return metrics

    def on_evaluate(self, context: StepContext, summary: dict[str, float]) -> None:
        """Ask for an epoch restart when the epoch made validation worse (see the module docstring), and say so
        when the constraint is violated on held-out pairs but λ never moved: the slack swallowed it."""
        self.last_evaluation = {key: summary[key] for key in (ACCURACY_METRIC, NEGATIVE_MARGIN_METRIC) if key in summary}
        if context.epoch_end and self.may_request_epoch_restart:
            self._judge_epoch(context)
        self._check_inactive(context, summary)

    def _judge_epoch(self, context: StepContext) -> None:
        accuracy = self.last_evaluation.get(ACCURACY_METRIC)
        negative = self.last_evaluation.get(NEGATIVE_MARGIN_METRIC)
        threshold = self.settings.restart_negative_margin_threshold
        reasons = []
        if accuracy is not None and self.epoch_baseline is not None and accuracy < self.epoch_baseline:
            reasons.append(f"validation accuracy fell from {self.epoch_baseline:.3f} at the epoch's start to {accuracy:.3f}")
        if negative is not None and negative > threshold:
            reasons.append(f"{negative:.1%} of validation pairs have a negative per-token margin (> {threshold:.1%})")
        if not reasons:
            return
        scale = self.step_scale * self.settings.restart_lambda_step_factor
        context.request_epoch_restart(
            "; ".join(reasons) + f"; λ's step is tightened: lagrangian_lr {scale * self.settings.lagrangian_lr:.4g}, "
            f"lambda_step_clip {scale * self.settings.lambda_step_clip:.4g}",
            accuracy=accuracy, baseline_accuracy=self.epoch_baseline,
            negative_margin_fraction_per_token=negative, negative_margin_threshold=threshold,
            lagrangian_lr=scale * self.settings.lagrangian_lr, lambda_step_clip=scale * self.settings.lambda_step_clip,
            what_to_try="if every epoch restarts, lower training.learning_rate or margin_threshold; "
            "the restarted epoch sees the same data order",
        )

    def on_epoch_restart(self, context: StepContext) -> dict[str, float]:
        """Tighten λ's step for the rest of the run (this controller's state is the epoch start's again)."""
        self.epoch_restarts += 1
        self.step_scale *= self.settings.restart_lambda_step_factor
        return {"lagrangian/step_scale": self.step_scale}

    def _check_inactive(self, context: StepContext, summary: dict[str, float]) -> None:
        violated = summary.get("eval/constraint/violated")
        if context.step == 0 or violated is None or not self.history or self.inactive_alerted:
            return
        if violated > 0 and max(entry["lambda"] for entry in self.history) == 0.0:
            self.inactive_alerted = True
            context.alert(
                "constraint_inactive",
                f"{violated:.0%} of validation pairs are below τ, but λ has stayed 0 for {len(self.history)} steps: the mean "
                f"violation never exceeded constraint_slack ({self.settings.constraint_slack:g}), so CPO has trained as plain DPO",
                what_it_means="the margin constraint is not acting on this run",
                what_to_try="lower constraint_slack, raise lagrangian_lr or margin_threshold, or use mode: hard",
                violated=violated, slack=self.settings.constraint_slack,
            )

    def state_dict(self) -> dict[str, Any]:
        state = {
            "inactive_alerted": self.inactive_alerted,
            "lambda": self.multiplier,
            "threshold": self.threshold,
            "monitored_metric": self.monitored,
            "history": list(self.history),
            "step_scale": self.step_scale,
            "epoch_restarts": self.epoch_restarts,
            "last_evaluation": dict(self.last_evaluation),
            "epoch_baseline": self.epoch_baseline,
        }
        if self.anchor:
            state["anchor_multiplier"] = self.anchor_multiplier
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multiplier = float(state["lambda"])
        self.history = list(state["history"])
        self.inactive_alerted = bool(state["inactive_alerted"])
        if self.anchor:
            self.anchor_multiplier = float(state.get("anchor_multiplier", 0.0))
        # .get: checkpoints written before the epoch restart rule hold none of these.
        self.step_scale = float(state.get("step_scale", 1.0))
        self.epoch_restarts = int(state.get("epoch_restarts", 0))
        self.last_evaluation = dict(state.get("last_evaluation", {}))
        self.epoch_baseline = state.get("epoch_baseline")

    def export(self, folder: Path) -> None:
        atomic_write_json(folder / STATE_FILE, {**self.state_dict(), "settings": self.settings.model_dump(mode="json")})
