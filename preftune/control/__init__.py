"""Controllers: hooks around the optimiser step that own their state (so resume is exact).

They see a narrow `StepContext` (step, metrics, LR scale, alert sink, requests to the loop),
never the trainer, and pass values to the loss through `loss_inputs()`, never by mutating it.
"""

from preftune.control.alerts import AlertSettings, TrainingAlerts
from preftune.control.base import AlertSink, Controller, StepContext
from preftune.control.monitors import LossScaleAlert, LRReductionOnAlert, NonFiniteGuard

__all__ = [
    "AlertSettings", "AlertSink", "Controller", "LossScaleAlert", "LRReductionOnAlert", "NonFiniteGuard", "StepContext", "TrainingAlerts",
]
