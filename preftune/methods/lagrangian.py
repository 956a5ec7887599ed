"""CPO's Lagrange multiplier λ: a dual-ascent step after every optimiser step, never a trainable weight.

    λ ← clamp(λ + clip(η · (v − slack), ±lambda_step_clip), 0, lambda_max)

η = `lagrangian_lr`; v = the step's constraint violation, averaged over every pair of the step:
the mean hinge relu(τ − margin) in `soft` mode, the fraction of pairs with margin < τ in `hard`
mode. λ rises while the constraint is violated more than `constraint_slack` and falls back
toward 0 once it holds. The loss receives λ as an argument (`loss_inputs`), a constant to autograd.
In both modes the loss penalises each violating pair by λ·(τ − margin) (preftune/losses/cpo.py);
the mode only changes the quantity λ follows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.atomic import atomic_write_json
from preftune.control import Controller, StepContext

MONITORED_METRIC = {"soft": "constraint/hinge", "hard": "constraint/violated"}
STATE_FILE = "lagrangian_state.json"


def dual_step(multiplier: float, violation: float, settings) -> float:
    """One projected, clipped dual-ascent step on λ (see the module docstring)."""
    step = settings.lagrangian_lr * (violation - settings.constraint_slack)
    step = max(-settings.lambda_step_clip, min(settings.lambda_step_clip, step))
    return max(0.0, min(settings.lambda_max, multiplier + step))


class LagrangianController(Controller):
    """Owns λ and its history; hands λ to the loss through `loss_inputs()`."""

    name = "lagrangian"

    def __init__(self, settings, *, threshold: float):
        self.settings = settings
        self.threshold = threshold
        self.monitored = MONITORED_METRIC[settings.mode]
        self.history: list[dict[str, float]] = []  # one entry per optimiser step
        self.multiplier = float(settings.initial_lambda)
        self.inactive_alerted = False

    def loss_inputs(self) -> dict[str, Any]:
        return {"lagrange_multiplier": self.multiplier}

    def on_epoch_start(self, context: StepContext) -> dict[str, float]:
        if self.settings.reset_lambda_each_epoch:
            self.multiplier = float(self.settings.initial_lambda)
        return {"lagrangian/lambda": self.multiplier}

    def on_step_end(self, context: StepContext) -> dict[str, float]:
        # `metrics` are means over every pair of the step (all micro-batches and processes), so every
        # process takes the same step.
        violation = context.metrics[self.monitored]
        used = self.multiplier
        self.multiplier = dual_step(used, violation, self.settings)
        self.history.append(
            {
                "step": context.step,
                "epoch": context.metrics["epoch"],
                "violation": violation,
                "lambda_used": used,  # λ the step's loss was computed with
                "lambda": self.multiplier,  # λ after the dual step, used by the next step
            }
        )
        return {"lagrangian/lambda": self.multiplier, "lagrangian/violation": violation}

    def on_evaluate(self, context: StepContext, summary: dict[str, float]) -> None:
        """Say so when the constraint is violated on held-out pairs but λ never moved: the slack swallowed it."""
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
        return {
            "inactive_alerted": self.inactive_alerted,
            "lambda": self.multiplier,
            "threshold": self.threshold,
            "monitored_metric": self.monitored,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multiplier = float(state["lambda"])
        self.history = list(state["history"])
        self.inactive_alerted = bool(state["inactive_alerted"])

    def export(self, folder: Path) -> None:
        atomic_write_json(folder / STATE_FILE, {**self.state_dict(), "settings": self.settings.model_dump(mode="json")})
