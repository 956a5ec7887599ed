"""What a controller is and what it sees.

The loop calls, in order: `on_train_start` once, `on_epoch_start` per epoch, `before_step` after
the gradients of a step are complete (the step can still be skipped), `on_step_end` after every
optimiser step, `on_evaluate` after every evaluation, and `export` with the run's final/ folder.
Hooks return metrics to log (or nothing). `loss_inputs()` are keyword arguments the loop passes
to the method's loss on every micro-batch (CPO's λ). `state_dict()` must be JSON-serialisable; it
is saved in every checkpoint and handed back through `load_state_dict` on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class AlertSink(Protocol):
    def __call__(self, kind: str, message: str, **details: Any) -> None: ...


@dataclass
class StepContext:
    """The loop's state as a controller may see and steer it.

    `lr_scale` multiplies the learning-rate schedule (the loop applies it on top of the scheduler
    before every optimiser step). A controller sets `skip_step` in `before_step` to drop a step's
    update.
    """

    step: int  # optimiser steps completed
    total_steps: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    lr_scale: float = 1.0
    alert: AlertSink = lambda kind, message, **details: None
    skip_step: bool = False


class Controller:
    name: str = "controller"

    def on_train_start(self, context: StepContext) -> None:
        pass

    def on_epoch_start(self, context: StepContext) -> dict[str, float] | None:
        return None

    def before_step(self, context: StepContext) -> dict[str, float] | None:
        return None

    def on_step_end(self, context: StepContext) -> dict[str, float] | None:
        return None

    def on_evaluate(self, context: StepContext, summary: dict[str, float]) -> dict[str, float] | None:
        return None

    def loss_inputs(self) -> dict[str, Any]:
        return {}

    def export(self, folder: Path) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
