"""Controllers: hooks around the optimiser step that own their state (so resume is exact).

The trainer calls, in order: `on_train_start` once, `on_epoch_start` per epoch,
`on_step_end` after every optimiser step, `on_evaluate` after every evaluation, and
`on_export` with the run's final/ folder (for the controller's own files). The hooks before
export return metrics to log (or nothing). `state_dict()` must be JSON-serialisable; it is
saved in every checkpoint and handed back through `load_state_dict` on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from preftune.train.trainer import Trainer


class Controller:
    name: str = "controller"

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> dict[str, float] | None:
        return None

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, float] | None:
        return None

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, float] | None:
        return None

    def on_export(self, trainer: Trainer, folder: Path) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
