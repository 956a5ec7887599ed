"""Generic controllers: an LR cut when a validation metric stays above a threshold, and the guard that
keeps non-finite updates out of the weights (the alert rules are in preftune/control/alerts.py).

Evaluations before the first optimiser step are ignored by the validation monitors: the policy
still equals the reference there, so its margins say nothing about training.
"""

from __future__ import annotations

import math
from typing import Any

from preftune.control.base import Controller, StepContext
from preftune.errors import PreftuneError


class LRReductionOnAlert(Controller):
    """Lower the learning rate by `reduction` when validation `metric` > `threshold` for `patience` evaluations in a row.

    The cut lasts for the rest of the run and composes with the schedule: this controller owns a
    scale s (1, then (1 − reduction)^k) and multiplies the loop's `lr_scale` by each cut; the loop
    applies that scale on top of the schedule and keeps it in its own checkpointed state, so a
    resumed run continues at the same LR.
    """

    def __init__(self, *, name: str, metric: str, threshold: float, patience: int, reduction: float, description: str):
        self.name = name
        self.metric = metric
        self.threshold = threshold
        self.patience = patience
        self.reduction = reduction
        self.description = description
        self.lr_scale = 1.0
        self.consecutive = 0
        self.reductions: list[dict[str, float]] = []

    def on_evaluate(self, context: StepContext, summary: dict[str, float]) -> dict[str, float] | None:
        value = summary.get(self.metric)
        if context.step == 0 or value is None:
            return None
        self.consecutive = self.consecutive + 1 if value > self.threshold else 0
        if self.consecutive >= self.patience:
            self.consecutive = 0
            self.lr_scale *= 1.0 - self.reduction
            context.lr_scale *= 1.0 - self.reduction
            self.reductions.append({"step": context.step, "value": value, "lr_scale": self.lr_scale})
            context.alert(
                self.name,
                f"{self.description}: {value:.1%} > {self.threshold:.1%} for {self.patience} evaluations in a row; "
                f"learning rate lowered by {self.reduction:.0%} (now {self.lr_scale:.3g} × the configured schedule)",
                metric=self.metric, value=value, threshold=self.threshold, lr_scale=self.lr_scale,
            )
        return {f"{self.name}/lr_scale": self.lr_scale}

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale, "consecutive": self.consecutive, "reductions": list(self.reductions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale = state["lr_scale"]
        self.consecutive = state["consecutive"]
        self.reductions = list(state["reductions"])


class TrainingDiverged(PreftuneError):
    """Too many steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard(Controller):
    """Skip a step whose loss or gradient norm is not finite; stop after `max_consecutive` such steps in a row.

    Runs in `before_step`, after the gradients are complete and before the optimiser touches the
    weights, so a NaN/inf update is never applied and never reaches a checkpoint. Every skipped
    step is counted, logged as `nonfinite/skipped_steps` and alerted.
    """

    name = "nonfinite_guard"

    def __init__(self, *, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def before_step(self, context: StepContext) -> dict[str, float] | None:
        bad = {key: context.metrics[key] for key in ("loss", "grad_norm") if key in context.metrics}
        bad = {key: value for key, value in bad.items() if not math.isfinite(value)}
        if not bad:
            self.consecutive = 0
            return None
        self.skipped += 1
        self.consecutive += 1
        context.skip_step = True
        described = ", ".join(f"{key} {value}" for key, value in bad.items())
        if self.consecutive > self.max_consecutive:
            raise TrainingDiverged(
                f"{described} at step {context.step + 1}, {self.consecutive} steps in a row; no update was applied. "
                "Lower training.learning_rate (or method.beta), or use training.mixed_precision: no"
            )
        context.alert(
            "nonfinite_step",
            f"{described} at step {context.step + 1}: the update was skipped ({self.skipped} skipped so far)",
            **{key: str(value) for key, value in bad.items()},
        )
        return {"nonfinite/skipped_steps": float(self.skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = state["skipped"]
        self.consecutive = state["consecutive"]


class LossScaleAlert(Controller):
    """Alert once when a step's training loss exceeds `threshold`.

    Preference losses of a sane run are O(1) (DPO starts at log 2 ≈ 0.69); a loss in the hundreds
    means an extreme learning rate or beta, and the run would otherwise train to the end without a
    word. One alert per run (the flag is checkpointed, so a resume does not repeat it).
    """

    name = "loss_scale"

    def __init__(self, *, threshold: float):
        self.threshold = threshold
        self.alerted = False

    def on_step_end(self, context: StepContext) -> dict[str, float] | None:
        loss = context.metrics.get("loss")
        if self.alerted or loss is None or not math.isfinite(loss) or loss <= self.threshold:
            return None
        self.alerted = True
        context.alert(
            self.name,
            f"training loss {loss:.4g} at step {context.step} exceeds {self.threshold:g}: an extreme learning_rate or "
            "beta, or a broken model; lower training.learning_rate / method.beta (this alert is shown once)",
            loss=loss, threshold=self.threshold,
        )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"alerted": self.alerted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alerted = state["alerted"]
