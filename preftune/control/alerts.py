"""Alert rules: pure functions over metric streams that say when a preference run is going wrong.

Input is a list of metric rows as in `metrics.jsonl` (`{"step", "time", ...}`; evaluation rows
carry `eval/...` keys; non-finite floats may appear as the strings "nan", "inf", "-inf"). Each
rule judges the stream as it stands (a controller calls them after every evaluation, the report
once on the finished stream) and returns an `Alert` or None. `evaluate_alerts` runs them all.

Evaluations at step 0 are left out of every rule that judges the policy against its reference
(negative margins, constraint violations, the accuracy trend): there the policy IS the reference,
every margin is 0, and a tie says nothing about training.

Rules and the test each uses (defaults in `AlertSettings`):

    negative_margin           latest eval/negative_margin_fraction > alert_negative_margin_ratio
    loss_accuracy_decoupling  over the last `decoupling_window` evaluations (steps s0..s1): the
                              least-squares slope of the training `loss` over the logged steps in
                              [s0, s1] is below −decoupling_loss_t standard errors (it keeps falling)
                              while the slope of eval/rewards/accuracies over those evaluations is
                              below +decoupling_accuracy_t standard errors (flat or falling)
    likelihood_displacement   eval/logps/chosen and eval/logps/rejected (policy, per-token means) both
                              fell by more than displacement_min_drop since the first evaluation and,
                              with 3+ evaluations, both slopes are below −displacement_t standard errors
    reference_drift           an eval/reference/logps/* metric (reference log-probs of the same fixed
                              batch) moved more than reference_drift_tolerance between evaluations;
                              `reference_drift_in_evaluations` does the same per example from
                              evaluations/step-N.jsonl
    non_finite_metric         any metric value is NaN or ±inf
    constraint_violation      CPO: latest eval/constraint/violated (fraction of validation pairs with
                              margin < τ) > alert_constraint_violation_ratio

Slope standard error: for points (x_i, y_i), b = Sxy / Sxx and se(b) = √(Σ r_i² / (n − 2) / Sxx)
with residuals r_i; it needs n ≥ 3.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from preftune.control.base import Controller, StepContext
from preftune.runfolder import EVAL_PREFIX
from preftune.settings import Section

NEGATIVE_MARGIN = "negative_margin"
DECOUPLING = "loss_accuracy_decoupling"
DISPLACEMENT = "likelihood_displacement"
REFERENCE_DRIFT = "reference_drift"
NON_FINITE = "non_finite_metric"
CONSTRAINT_VIOLATION = "constraint_violation"

NEGATIVE_MARGIN_METRIC = "eval/negative_margin_fraction"
ACCURACY_METRIC = "eval/rewards/accuracies"
CHOSEN_METRIC = "eval/logps/chosen"
REJECTED_METRIC = "eval/logps/rejected"
VIOLATION_METRIC = "eval/constraint/violated"
REFERENCE_METRICS = ("eval/reference/logps/chosen", "eval/reference/logps/rejected")
_NON_FINITE_STRINGS = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"}

# kind -> (what it means, what to try); also covers the kinds the training monitors write to alerts.jsonl.
GUIDANCE: dict[str, tuple[str, str]] = {
    NEGATIVE_MARGIN: (
        "Too many validation pairs are ranked the wrong way: the policy prefers the rejected answer over the "
        "chosen one by more than the reference did.",
        "Lower the learning rate or β; check the data for swapped chosen/rejected labels; evaluate more often.",
    ),
    "negative_margin_alert": (
        "Too many validation pairs are ranked the wrong way (reward margin < 0).",
        "Lower the learning rate or β; check the data for swapped chosen/rejected labels.",
    ),
    DECOUPLING: (
        "The training loss keeps falling but validation preference accuracy does not rise: the policy is "
        "fitting the training pairs (or their length/style) rather than the preference.",
        "Stop at the best validation step; lower the learning rate or the number of epochs; raise β; "
        "add or diversify training pairs.",
    ),
    DISPLACEMENT: (
        "Likelihood displacement: the margin grows because both answers lose probability, the rejected one "
        "faster. The chosen answers become less likely too, so the probability mass goes to answers in neither set.",
        "Add an SFT/NLL term on the chosen answer (simpo_sft_weight, or contrastive_cpo's cpo_alpha); lower the "
        "learning rate; use a larger β; use CPO's margin constraint rather than a larger learning rate.",
    ),
    REFERENCE_DRIFT: (
        "The reference model's log-probs of the same examples changed between evaluations: the reference is "
        "not frozen (an adapter leaked into it, the base weights were trained, or the cache is stale), so "
        "every reward margin is measured against a moving target.",
        "Check that the reference is the adapter-disabled view or a frozen copy; clear the reference-logps "
        "cache; make sure only adapter weights are trainable.",
    ),
    NON_FINITE: (
        "A metric became NaN or infinite: the update diverged or a log-prob underflowed.",
        "Lower the learning rate; turn off fp16 (use bf16 or no mixed precision); keep max_grad_norm on; "
        "resume from the last good checkpoint.",
    ),
    CONSTRAINT_VIOLATION: (
        "Too many validation pairs miss CPO's margin constraint (margin < τ): the Lagrange multiplier λ is not "
        "holding the constraint on held-out pairs.",
        "Give λ time or a larger lagrangian_lr; lower the learning rate; lower margin_threshold τ if it is "
        "unreachable for this model; check that λ is not pinned at lambda_max.",
    ),
    "constraint_violation_lr": (
        "Validation pairs kept violating CPO's margin constraint for several evaluations, so the learning rate "
        "was lowered.",
        "If it repeats, lower margin_threshold τ or the initial learning rate.",
    ),
}


class AlertSettings(Section):
    """Thresholds of the alert rules (module docstring: what each rule tests)."""

    alert_negative_margin_ratio: float = Field(
        0.15, ge=0.0, le=1.0, description="alert when the validation fraction of pairs with reward margin < 0 exceeds this"
    )
    decoupling_window: int = Field(
        4, ge=3, description="evaluations (after step 0) the loss/accuracy trends are fitted over"
    )
    decoupling_min_train_points: int = Field(
        5, ge=3, description="logged training steps the window must hold for the training-loss slope"
    )
    decoupling_loss_t: float = Field(
        2.0, gt=0.0, description="training loss counts as falling when its slope is below −this many standard errors"
    )
    decoupling_accuracy_t: float = Field(
        1.0, description="validation accuracy counts as flat or falling when its slope is below this many standard errors"
    )
    displacement_min_drop: float = Field(
        0.1, ge=0.0, description="nats per token both answers' mean log-probs must have fallen since the first evaluation"
    )
    displacement_t: float = Field(
        2.0, gt=0.0, description="with 3+ evaluations, both log-prob slopes must be below −this many standard errors"
    )
    reference_drift_tolerance: float = Field(
        1e-3, ge=0.0, description="nats per token a reference log-prob may move between evaluations (packing noise)"
    )
    alert_constraint_violation_ratio: float = Field(
        0.25, ge=0.0, le=1.0, description="CPO: alert when the validation fraction of pairs with margin < τ exceeds this"
    )
    loss_alert_threshold: float | None = Field(
        100.0, gt=0.0, description="alert once when a step's training loss exceeds this (extreme lr/beta); null = off"
    )


@dataclass
class Alert:
    kind: str
    step: int
    message: str
    what_it_means: str
    what_to_try: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """The alerts.jsonl shape: details flattened next to step, kind and message."""
        return {
            **self.details,
            "step": self.step,
            "kind": self.kind,
            "message": self.message,
            "what_it_means": self.what_it_means,
            "what_to_try": self.what_to_try,
        }


def _alert(kind: str, step: int, message: str, **details: Any) -> Alert:
    means, to_try = GUIDANCE[kind]
    return Alert(kind, int(step), message, means, to_try, details)


def finite_value(row: Mapping[str, Any], key: str) -> float | None:
    """The row's value for `key` as a finite float, or None (absent, not a number, NaN or ±inf)."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def is_non_finite(value: Any) -> bool:
    """NaN or ±inf, as a float or as the string metrics.jsonl writes for it."""
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, str) and value.strip().lower() in _NON_FINITE_STRINGS


@dataclass(frozen=True)
class SlopeFit:
    slope: float
    stderr: float
    n: int

    @property
    def t(self) -> float:
        """slope / stderr; ±inf for an exact non-zero fit, 0 for an exactly flat one."""
        if self.stderr > 0:
            return self.slope / self.stderr
        return 0.0 if self.slope == 0 else math.copysign(math.inf, self.slope)


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> SlopeFit | None:
    """Least-squares slope of y on x and its standard error (module docstring); None below 3 points or one x."""
    n = len(xs)
    if n < 3 or n != len(ys):
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    intercept = mean_y - slope * mean_x
    residual_variance = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys)) / (n - 2)
    return SlopeFit(slope, math.sqrt(residual_variance / sxx), n)


def _is_eval(row: Mapping[str, Any]) -> bool:
    return any(key.startswith(EVAL_PREFIX) for key in row)


def _series(rows: Sequence[Mapping[str, Any]], key: str, *, after_start: bool) -> list[tuple[int, float]]:
    """(step, value) of the evaluation rows that have a finite `key`, in step order."""
    points = [
        (int(row["step"]), value)
        for row in rows
        if _is_eval(row) and (value := finite_value(row, key)) is not None and (not after_start or row["step"] > 0)
    ]
    return sorted(points, key=lambda point: point[0])


def _latest_above(rows: Sequence[Mapping[str, Any]], metric: str, threshold: float, kind: str, what: str) -> Alert | None:
    """`kind` when the latest evaluation (after step 0) of `metric` is above `threshold`; `what` describes the value."""
    series = _series(rows, metric, after_start=True)
    if not series or series[-1][1] <= threshold:
        return None
    step, value = series[-1]
    return _alert(kind, step, f"{value:.1%} of validation pairs {what} (alert above {threshold:.0%})",
                  metric=metric, value=value, threshold=threshold)


def negative_margin_alert(rows: Sequence[Mapping[str, Any]], settings: AlertSettings) -> Alert | None:
    return _latest_above(rows, NEGATIVE_MARGIN_METRIC, settings.alert_negative_margin_ratio, NEGATIVE_MARGIN,
                         "have a negative reward margin")


def decoupling_alert(rows: Sequence[Mapping[str, Any]], settings: AlertSettings) -> Alert | None:
    evaluations = _series(rows, ACCURACY_METRIC, after_start=True)[-settings.decoupling_window :]
    if len(evaluations) < settings.decoupling_window:
        return None
    start, end = evaluations[0][0], evaluations[-1][0]
    train = [
        (int(row["step"]), value)
        for row in rows
        if not _is_eval(row) and start <= row.get("step", -1) <= end and (value := finite_value(row, "loss")) is not None
    ]
    if len(train) < settings.decoupling_min_train_points:
        return None
    loss_fit = fit_slope([s for s, _ in train], [v for _, v in train])
    accuracy_fit = fit_slope([s for s, _ in evaluations], [v for _, v in evaluations])
    if loss_fit is None or accuracy_fit is None:
        return None
    if not (loss_fit.t < -settings.decoupling_loss_t and accuracy_fit.t < settings.decoupling_accuracy_t):
        return None
    return _alert(
        DECOUPLING, end,
        f"steps {start}-{end}: training loss falls {loss_fit.slope:+.3g}/step (t = {loss_fit.t:.1f}) while validation "
        f"accuracy moves {accuracy_fit.slope:+.3g}/step (t = {accuracy_fit.t:.1f})",
        window=[start, end], loss_slope=loss_fit.slope, loss_slope_stderr=loss_fit.stderr,
        accuracy_slope=accuracy_fit.slope, accuracy_slope_stderr=accuracy_fit.stderr,
    )


def likelihood_displacement_alert(rows: Sequence[Mapping[str, Any]], settings: AlertSettings) -> Alert | None:
    chosen = dict(_series(rows, CHOSEN_METRIC, after_start=False))
    rejected = dict(_series(rows, REJECTED_METRIC, after_start=False))
    steps = sorted(set(chosen) & set(rejected))
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]
    chosen_drop, rejected_drop = chosen[first] - chosen[last], rejected[first] - rejected[last]
    if min(chosen_drop, rejected_drop) <= settings.displacement_min_drop:
        return None
    if len(steps) >= 3:
        fits = [fit_slope(steps, [series[s] for s in steps]) for series in (chosen, rejected)]
        if any(fit is None or fit.t >= -settings.displacement_t for fit in fits):
            return None
    return _alert(
        DISPLACEMENT, last,
        f"both answers became less likely since step {first}: log p(chosen) per token {-chosen_drop:+.3f}, "
        f"log p(rejected) per token {-rejected_drop:+.3f}",
        chosen_change=-chosen_drop, rejected_change=-rejected_drop, since_step=first,
    )


def reference_drift_alert(rows: Sequence[Mapping[str, Any]], settings: AlertSettings) -> Alert | None:
    worst: tuple[float, str, int] | None = None
    for key in REFERENCE_METRICS:
        series = _series(rows, key, after_start=False)
        for step, value in series[1:]:
            moved = abs(value - series[0][1])
            if moved > settings.reference_drift_tolerance and (worst is None or moved > worst[0]):
                worst = (moved, key, step)
    if worst is None:
        return None
    moved, key, step = worst
    return _alert(
        REFERENCE_DRIFT, step, f"{key} moved by {moved:.3g} nats/token between evaluations (tolerance {settings.reference_drift_tolerance:g})",
        metric=key, moved=moved, tolerance=settings.reference_drift_tolerance,
    )


def reference_drift_in_evaluations(
    evaluations: Mapping[int, Sequence[Mapping[str, Any]]], settings: AlertSettings
) -> Alert | None:
    """Per example: each answer's reference log-prob per token (reference_logps / answer_tokens) in every
    evaluation against the first one, matched by `example`."""
    steps = sorted(evaluations)
    if len(steps) < 2:
        return None

    def per_token(rows: Sequence[Mapping[str, Any]]) -> dict[int, list[float]]:
        return {
            row["example"]: [logp / max(count, 1) for logp, count in zip(row["reference_logps"], row["answer_tokens"])]
            for row in rows
            if row.get("reference_logps") is not None
        }

    first = per_token(evaluations[steps[0]])
    worst: tuple[float, int, int] | None = None
    for step in steps[1:]:
        for example, values in per_token(evaluations[step]).items():
            if example not in first:
                continue
            moved = max(abs(a - b) for a, b in zip(values, first[example]))
            if moved > settings.reference_drift_tolerance and (worst is None or moved > worst[0]):
                worst = (moved, example, step)
    if worst is None:
        return None
    moved, example, step = worst
    return _alert(
        REFERENCE_DRIFT, step,
        f"the reference log-prob of validation example {example} moved by {moved:.3g} nats/token between step {steps[0]} "
        f"and step {step} (tolerance {settings.reference_drift_tolerance:g})",
        example=example, moved=moved, tolerance=settings.reference_drift_tolerance,
    )


def non_finite_alert(rows: Sequence[Mapping[str, Any]], settings: AlertSettings) -> Alert | None:
    first_step: int | None = None
    keys: set[str] = set()
    for row in rows:
        bad = [key for key, value in row.items() if key not in ("step", "time") and is_non_finite(value)]
        if bad:
            first_step = int(row.get("step", 0)) if first_step is None else first_step
            keys.update(bad)
    if first_step is None:
        return None
    return _alert(
        NON_FINITE, first_step, f"non-finite values from step {first_step} on in: {', '.join(sorted(keys))}", keys=sorted(keys)
    )


def constraint_violation_alert(rows: Sequence[Mapping[str, Any]], settings: AlertSettings) -> Alert | None:
    return _latest_above(rows, VIOLATION_METRIC, settings.alert_constraint_violation_ratio, CONSTRAINT_VIOLATION,
                         "violate the CPO margin constraint (margin < τ)")


RULES = (
    non_finite_alert,
    negative_margin_alert,
    decoupling_alert,
    likelihood_displacement_alert,
    reference_drift_alert,
    constraint_violation_alert,
)


def evaluate_alerts(
    rows: Sequence[Mapping[str, Any]],
    settings: AlertSettings | None = None,
    *,
    evaluations: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
) -> list[Alert]:
    """Every rule over the metric rows (plus the per-example reference check when `evaluations` are given)."""
    settings = settings or AlertSettings()
    alerts = [alert for rule in RULES if (alert := rule(rows, settings)) is not None]
    if evaluations and not any(alert.kind == REFERENCE_DRIFT for alert in alerts):
        if (drift := reference_drift_in_evaluations(evaluations, settings)) is not None:
            alerts.append(drift)
    return alerts


class TrainingAlerts(Controller):
    """The alert rules, run after every evaluation on the run's metrics so far; each alert goes to alerts.jsonl
    with what it means and what to try. A kind is alerted when it starts to hold, and again only after it cleared,
    so a persistent problem is one alert, not one per evaluation. Healthy runs stay quiet.

    It keeps what the rules read: every evaluation summary, and the step and loss of every training step.
    """

    name = "alerts"

    def __init__(self, settings: AlertSettings):
        self.settings = settings
        self.rows: list[dict[str, Any]] = []
        self.active: list[str] = []

    def on_step_end(self, context: StepContext) -> None:
        row = {"step": context.step, "loss": context.metrics.get("loss")}
        row.update({key: str(value) for key, value in context.metrics.items() if is_non_finite(value)})
        self.rows.append(row)

    def on_evaluate(self, context: StepContext, summary: dict[str, float]) -> None:
        self.rows.append({"step": context.step, **summary})
        alerts = evaluate_alerts(self.rows, self.settings)
        for alert in alerts:
            if alert.kind not in self.active:
                context.alert(
                    alert.kind, alert.message, what_it_means=alert.what_it_means, what_to_try=alert.what_to_try,
                    **alert.details,
                )
        self.active = sorted({alert.kind for alert in alerts})

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "active": list(self.active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])
        self.active = list(state["active"])
