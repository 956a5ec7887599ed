"""Generic validation monitors: an alert when a metric crosses a threshold, and an LR cut when it stays there.

Both read the evaluation summary (`eval/...` keys) in `on_evaluate` and write to alerts.jsonl
through `trainer.alert`. Evaluations before the first optimiser step are ignored: the policy
still equals the reference there, so its margins say nothing about training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from preftune.train.controllers import Controller

if TYPE_CHECKING:
    from preftune.train.trainer import Trainer


class ThresholdAlert(Controller):
    """Alert whenever validation `metric` is above `threshold`."""

    def __init__(self, *, name: str, metric: str, threshold: float, description: str):
        self.name = name
        self.metric = metric
        self.threshold = threshold
        self.description = description

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if trainer.state.global_step > 0 and value is not None and value > self.threshold:
            trainer.alert(
                self.name,
                f"{self.description}: {value:.1%} > {self.threshold:.1%}",
                metric=self.metric, value=value, threshold=self.threshold,
            )


class LRReductionOnAlert(Controller):
    """Lower the learning rate by `reduction` when validation `metric` > `threshold` for `patience` evaluations in a row.

    The cut lasts for the rest of the run and composes with the scheduler: this controller owns a
    scale s (1, then (1 − reduction)^k), sets the scheduler's base LRs to s × the initial LR and
    scales the live LR by the same factor, so the schedule's shape continues from the lower level.
    s and the consecutive count are in the checkpoint and re-applied on resume.
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

    def on_train_start(self, trainer: Trainer) -> None:
        _set_base_lrs(trainer, self.lr_scale)

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, float] | None:
        value = metrics.get(self.metric)
        if trainer.state.global_step == 0 or value is None:
            return None
        self.consecutive = self.consecutive + 1 if value > self.threshold else 0
        if self.consecutive >= self.patience:
            self.consecutive = 0
            self.lr_scale *= 1.0 - self.reduction
            for group in trainer.optimizer.param_groups:
                group["lr"] *= 1.0 - self.reduction
            _set_base_lrs(trainer, self.lr_scale)
            self.reductions.append({"step": trainer.state.global_step, "value": value, "lr_scale": self.lr_scale})
            trainer.alert(
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


def _set_base_lrs(trainer: Trainer, scale: float) -> None:
    """Scheduler LR = base_lr × factor(step); `initial_lr` is the configured LR the optimiser group started with."""
    scheduler = trainer.scheduler
    scheduler.base_lrs = [group["initial_lr"] * scale for group in trainer.optimizer.param_groups]
    # The LR logged with the next step comes from here; keep it equal to the LR the optimiser will use.
    scheduler._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]


def monitoring_controllers(monitoring) -> list[Controller]:
    """The controllers `monitoring:` asks for, whatever the method."""
    controllers: list[Controller] = []
    if monitoring.negative_margin_alert is not None:
        controllers.append(
            ThresholdAlert(
                name="negative_margin_alert",
                metric="eval/negative_margin_fraction",
                threshold=monitoring.negative_margin_alert,
                description="validation pairs ranked the wrong way (reward margin < 0)",
            )
        )
    return controllers
