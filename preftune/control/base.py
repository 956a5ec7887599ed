"""What a controller is and what it sees.

The loop calls, in order: `on_train_start` once, `on_epoch_start` per epoch, `before_step` after
the gradients of a step are complete (the step can still be skipped), `on_step_end` after every
optimiser step, `on_evaluate` after every evaluation, `on_epoch_restart` after the loop rolled an
epoch back to its start (see below), and `export` with the run's final/ folder.
Hooks return metrics to log (or nothing). `loss_inputs()` are keyword arguments the loop passes
to the method's loss on every micro-batch (CPO's λ). `state_dict()` must be JSON-serialisable; it
is saved in every checkpoint and handed back through `load_state_dict` on resume.

Epoch restarts: a controller whose `may_request_epoch_restart` is true makes the loop write a
checkpoint at every epoch start and evaluate at every epoch end. In `on_evaluate` of the
evaluation that closes an epoch (`context.epoch_end`) it may call
`context.request_epoch_restart(reason, **details)`; the loop then restores that epoch's start
(weights, optimiser, scheduler, RNG, every controller's state, the run folder's records), writes
an `epoch_restart` alert, calls every controller's `on_epoch_restart`, checkpoints the restored
state again and trains the epoch anew. State a controller changes in `on_epoch_restart` is the
state the retrained epoch starts from and is what the epoch-start checkpoint holds.
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
    update. In the evaluation that closes an epoch (`epoch_end`; `epoch` is then the index of the
    next epoch) a controller may call `request_epoch_restart`.
    """

    step: int  # optimiser steps completed
    total_steps: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    lr_scale: float = 1.0
    alert: AlertSink = lambda kind, message, **details: None
    skip_step: bool = False
    epoch_end: bool = False
    epoch_restart: dict[str, Any] | None = None  # set by request_epoch_restart: {"reason": ..., **details}

    def request_epoch_restart(self, reason: str, **details: Any) -> None:
        """Ask the loop to roll back to the start of the epoch that just ended and train it again."""
        if not self.epoch_end:
            raise RuntimeError("an epoch restart can only be requested in the evaluation that closes an epoch")
        self.epoch_restart = {"reason": reason, **details}


class Controller:
    name: str = "controller"
    # True while this controller may still call `request_epoch_restart`: the loop then checkpoints every
    # epoch start and evaluates every epoch end (cost a rule that is off must not pay).
    may_request_epoch_restart: bool = False

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

    def on_epoch_restart(self, context: StepContext) -> dict[str, float] | None:
        """Called after the loop restored the start of the epoch being trained again (this controller's
        state is back to that point); `context.epoch_restart` is the request."""
        return None

    def loss_inputs(self) -> dict[str, Any]:
        return {}

    def export(self, folder: Path) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
