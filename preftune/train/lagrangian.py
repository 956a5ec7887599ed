"""CPO's Lagrange multiplier λ: a dual-ascent step after every optimiser step, never a trainable weight.

    λ ← clamp(λ + clip(η · (v − slack), ±lambda_step_clip), 0, lambda_max)

η = `lagrangian_lr`; v = the step's constraint violation, averaged over every pair of the step:
the mean hinge relu(τ − margin) in `soft` mode, the fraction of pairs with margin < τ in `hard`
mode. λ rises while the constraint is violated more than `constraint_slack` and falls back
toward 0 once it holds. The loss reads λ as a constant (no gradient reaches it). In both modes the
loss penalises each violating pair by λ·(τ − margin) (see preftune/losses/cpo.py); the mode only
changes the quantity λ follows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.atomic import atomic_write_json
from preftune.train.controllers import Controller
from preftune.train.monitors import LRReductionOnAlert

if TYPE_CHECKING:
    from preftune.losses.cpo import ConstrainedDPOLoss
    from preftune.train.trainer import Trainer

MONITORED_METRIC = {"soft": "constraint/hinge", "hard": "constraint/violated"}
STATE_FILE = "lagrangian_state.json"


def dual_step(multiplier: float, violation: float, settings) -> float:
    """One projected, clipped dual-ascent step on λ (see the module docstring)."""
    step = settings.lagrangian_lr * (violation - settings.constraint_slack)
    step = max(-settings.lambda_step_clip, min(settings.lambda_step_clip, step))
    return max(0.0, min(settings.lambda_max, multiplier + step))


class LagrangianController(Controller):
    """Owns λ and its history; writes λ into the loss after every change."""

    name = "lagrangian"

    def __init__(self, loss: ConstrainedDPOLoss, settings):
        self.loss = loss
        self.settings = settings
        self.monitored = MONITORED_METRIC[settings.mode]
        self.history: list[dict[str, float]] = []  # one entry per optimiser step
        self._set(settings.initial_lambda)

    @property
    def multiplier(self) -> float:
        return self.loss.lagrange_multiplier

    def _set(self, value: float) -> None:
        self.loss.lagrange_multiplier = float(value)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> dict[str, float] | None:
        if self.settings.reset_lambda_each_epoch:
            self._set(self.settings.initial_lambda)
        return {"lagrangian/lambda": self.multiplier}

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, float]:
        # `metrics` are means over every pair of the step (all micro-batches and processes), so every
        # process takes the same step.
        violation = metrics[self.monitored]
        used = self.multiplier
        self._set(dual_step(used, violation, self.settings))
        self.history.append(
            {
                "step": trainer.state.global_step,
                "epoch": metrics["epoch"],
                "violation": violation,
                "lambda_used": used,  # λ the step's loss was computed with
                "lambda": self.multiplier,  # λ after the dual step, used by the next step
            }
        )
        return {"lagrangian/lambda": self.multiplier, "lagrangian/violation": violation}

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.multiplier, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set(state["lambda"])
        self.history = list(state["history"])

    def on_export(self, trainer: Trainer, folder: Path) -> None:
        atomic_write_json(
            folder / STATE_FILE,
            {
                "lambda": self.multiplier,
                "threshold": self.loss.threshold,
                "monitored_metric": self.monitored,
                "settings": self.settings.model_dump(mode="json"),
                "history": self.history,
            },
        )


def cpo_controllers(loss: ConstrainedDPOLoss, settings) -> list[Controller]:
    """λ's dual step, and the learning-rate cut when validation keeps violating the constraint."""
    controllers: list[Controller] = [LagrangianController(loss, settings)]
    if settings.violation_alert is not None:
        controllers.append(
            LRReductionOnAlert(
                name="constraint_violation_lr",
                metric="eval/constraint/violated",
                threshold=settings.violation_alert,
                patience=settings.patience,
                reduction=settings.lr_reduction,
                description="validation pairs violating the CPO margin constraint (margin < τ)",
            )
        )
    return controllers
