import math

import pytest
from pydantic import ValidationError

from preftune.control.alerts import (
    CONSTRAINT_VIOLATION,
    DECOUPLING,
    DISPLACEMENT,
    NEGATIVE_MARGIN,
    NON_FINITE,
    REFERENCE_DRIFT,
    AlertSettings,
    constraint_violation_alert,
    decoupling_alert,
    evaluate_alerts,
    fit_slope,
    likelihood_displacement_alert,
    negative_margin_alert,
    non_finite_alert,
    reference_drift_alert,
    reference_drift_in_evaluations,
)

SETTINGS = AlertSettings()
EVAL_STEPS = [0, 2, 4, 6, 8, 10]


def stream(*, train_loss=None, eval_values=None):
    """Train rows for steps 1..10 and eval rows at EVAL_STEPS; `eval_values(step)` -> dict of eval/ metrics."""
    train_loss = train_loss or (lambda step: 0.69 - 0.02 * step + 0.003 * (-1) ** step)
    rows = []
    for step in range(0, 11):
        if step > 0:
            rows.append({"step": step, "time": 1.0 + step, "loss": train_loss(step), "learning_rate": 1e-4})
        if step in EVAL_STEPS:
            rows.append({"step": step, "time": 1.5 + step, **eval_values(step)})
    return rows


def healthy(step):
    return {
        "eval/loss": 0.69 - 0.01 * step,
        "eval/rewards/accuracies": 0.0 if step == 0 else 0.5 + 0.03 * step + 0.005 * (-1) ** (step // 2),
        "eval/negative_margin_fraction": 0.0 if step == 0 else 0.10,
        "eval/logps/chosen": -2.0 + 0.01 * step,
        "eval/logps/rejected": -2.1 - 0.02 * step,
        "eval/reference/logps/chosen": -2.0 + (1e-6 if step == 4 else 0.0),
        "eval/reference/logps/rejected": -2.1,
        "eval/constraint/violated": 1.0 if step == 0 else 0.10,
    }


def test_healthy_stream_raises_nothing():
    assert evaluate_alerts(stream(eval_values=healthy), SETTINGS) == []


def test_negative_margin_fraction_above_the_ratio():
    rows = stream(eval_values=lambda step: {**healthy(step), "eval/negative_margin_fraction": 0.2 if step == 10 else 0.1})
    alert = negative_margin_alert(rows, SETTINGS)
    assert alert.kind == NEGATIVE_MARGIN and alert.step == 10 and alert.details["value"] == 0.2
    assert alert.what_it_means and alert.what_to_try
    assert negative_margin_alert(rows, AlertSettings(alert_negative_margin_ratio=0.25)) is None


def test_decoupling_fires_when_training_loss_falls_and_validation_accuracy_is_flat():
    flat = lambda step: {**healthy(step), "eval/rewards/accuracies": 0.0 if step == 0 else 0.6 + 0.01 * (-1) ** (step // 2)}
    alert = decoupling_alert(stream(eval_values=flat), SETTINGS)
    assert alert.kind == DECOUPLING and alert.step == 10 and alert.details["window"] == [4, 10]
    assert alert.details["loss_slope"] == pytest.approx(-0.02, abs=0.002)
    falling = lambda step: {**healthy(step), "eval/rewards/accuracies": 0.9 - 0.02 * step}
    assert decoupling_alert(stream(eval_values=falling), SETTINGS) is not None


def test_decoupling_stays_quiet_when_the_loss_does_not_fall():
    flat = lambda step: {**healthy(step), "eval/rewards/accuracies": 0.6}
    noisy_flat_loss = lambda step: 0.5 + 0.05 * (-1) ** step
    assert decoupling_alert(stream(train_loss=noisy_flat_loss, eval_values=flat), SETTINGS) is None


def test_least_squares_slope_and_standard_error_by_hand():
    # y = 2x + [0, 1, 0, 1]: x − x̄ = [-1.5, -0.5, 0.5, 1.5], Sxx = 5, the pattern adds Sxy = 1 -> slope 2 + 1/5,
    # intercept ȳ − b·x̄ = 3.5 − 3.3 = 0.2; se = √(Σr² / (n − 2) / Sxx).
    fit = fit_slope([0, 1, 2, 3], [0, 3, 4, 7])
    assert fit.slope == pytest.approx(2.2)
    residuals = [0 - (0.2 + 0), 3 - (0.2 + 2.2), 4 - (0.2 + 4.4), 7 - (0.2 + 6.6)]
    assert fit.stderr == pytest.approx(math.sqrt(sum(r * r for r in residuals) / 2 / 5))
    assert fit_slope([1, 2], [1, 2]) is None
    assert fit_slope([1, 2, 3], [5, 5, 5]).t == 0.0


def test_likelihood_displacement_when_both_answers_fall():
    both = lambda step: {**healthy(step), "eval/logps/chosen": -2.0 - 0.03 * step, "eval/logps/rejected": -2.1 - 0.06 * step}
    alert = likelihood_displacement_alert(stream(eval_values=both), SETTINGS)
    assert alert.kind == DISPLACEMENT and alert.step == 10
    assert alert.details["chosen_change"] == pytest.approx(-0.3)
    assert alert.details["rejected_change"] == pytest.approx(-0.6)
    # A fall within the noise floor is not displacement.
    small = lambda step: {**healthy(step), "eval/logps/chosen": -2.0 - 0.005 * step, "eval/logps/rejected": -2.1 - 0.06 * step}
    assert likelihood_displacement_alert(stream(eval_values=small), SETTINGS) is None


def test_likelihood_displacement_needs_a_trend_not_one_bad_evaluation():
    # Both fall by 0.2 at the last evaluation only, after rising: the slope over 6 evaluations is not significantly negative.
    bumpy = lambda step: {
        **healthy(step),
        "eval/logps/chosen": [-2.0, -1.6, -2.3, -1.7, -1.9, -2.2][EVAL_STEPS.index(step)],
        "eval/logps/rejected": [-2.1, -1.7, -2.4, -1.8, -2.0, -2.3][EVAL_STEPS.index(step)],
    }
    assert likelihood_displacement_alert(stream(eval_values=bumpy), SETTINGS) is None


def test_reference_drift_in_metrics():
    drifting = lambda step: {**healthy(step), "eval/reference/logps/chosen": -2.0 + 0.01 * step}
    alert = reference_drift_alert(stream(eval_values=drifting), SETTINGS)
    assert alert.kind == REFERENCE_DRIFT and alert.step == 10 and alert.details["moved"] == pytest.approx(0.1)


def test_reference_drift_per_example():
    def rows(shift):
        return [
            {"example": 0, "answer_tokens": [4, 2], "reference_logps": [-8.0, -4.0]},
            {"example": 1, "answer_tokens": [5, 5], "reference_logps": [-10.0, -5.0 + shift]},
        ]

    assert reference_drift_in_evaluations({0: rows(0.0), 4: rows(1e-5)}, SETTINGS) is None
    alert = reference_drift_in_evaluations({0: rows(0.0), 4: rows(0.0), 8: rows(0.5)}, SETTINGS)
    assert (alert.step, alert.details["example"], alert.details["moved"]) == (8, 1, pytest.approx(0.1))
    assert evaluate_alerts(stream(eval_values=healthy), SETTINGS, evaluations={0: rows(0.0), 8: rows(0.5)})[0].kind == REFERENCE_DRIFT


def test_non_finite_values_as_floats_or_the_strings_metrics_jsonl_writes():
    rows = stream(eval_values=healthy)
    rows[5]["grad_norm"] = "nan"
    rows[7]["loss"] = float("inf")
    alert = non_finite_alert(rows, SETTINGS)
    assert alert.kind == NON_FINITE and alert.step == rows[5]["step"] and alert.details["keys"] == ["grad_norm", "loss"]


def test_constraint_violation_ignores_step_zero():
    rows = stream(eval_values=healthy)  # step 0: every pair violates (policy = reference), later 10%
    assert constraint_violation_alert(rows, SETTINGS) is None
    high = lambda step: {**healthy(step), "eval/constraint/violated": 0.4}
    alert = constraint_violation_alert(stream(eval_values=high), SETTINGS)
    assert alert.kind == CONSTRAINT_VIOLATION and alert.step == 10
    assert alert.to_row()["value"] == 0.4 and alert.to_row()["kind"] == CONSTRAINT_VIOLATION


def test_settings_refuse_unknown_keys():
    with pytest.raises(ValidationError):
        AlertSettings(alert_negative_margin=0.2)
    assert AlertSettings.model_fields["alert_negative_margin_ratio"].description


def test_the_training_controller_alerts_once_while_a_problem_holds_and_again_after_it_cleared():
    from preftune.control import AlertSettings, StepContext, TrainingAlerts

    raised = []
    controller = TrainingAlerts(AlertSettings(alert_negative_margin_ratio=0.15))

    def evaluate(step, fraction):
        context = StepContext(step=step, total_steps=10, epoch=0, alert=lambda kind, message, **details: raised.append((step, kind)))
        controller.on_step_end(StepContext(step=step, total_steps=10, epoch=0, metrics={"loss": 0.5}))
        controller.on_evaluate(context, {"eval/negative_margin_fraction": fraction, "eval/rewards/accuracies": 0.6})

    for step, fraction in [(1, 0.1), (2, 0.3), (3, 0.4), (4, 0.1), (5, 0.2)]:
        evaluate(step, fraction)
    assert raised == [(2, "negative_margin"), (5, "negative_margin")]
    restored = TrainingAlerts(AlertSettings())
    restored.load_state_dict(controller.state_dict())
    assert restored.active == ["negative_margin"] and restored.rows == controller.rows


def test_a_training_run_writes_its_alerts_with_what_they_mean(tmp_path):
    from preftune import runfolder
    from preftune.run import build_trainer
    from tests.support import save_tiny_model, tiny_run_config

    model_dir = save_tiny_model(tmp_path / "model")
    config = tiny_run_config(
        tmp_path / "run", model_dir, monitoring={"alert_negative_margin_ratio": 0.0}, training={"eval_steps": 1}
    )
    build_trainer(config).train()
    alerts = runfolder.read_jsonl(tmp_path / "run" / runfolder.ALERTS)
    negative = [a for a in alerts if a["kind"] == "negative_margin"]
    assert len(negative) <= 1 and all(a["what_it_means"] and a["what_to_try"] for a in alerts)
    quiet = tiny_run_config(tmp_path / "quiet", model_dir, monitoring={"alerts": False}, training={"eval_steps": 1})
    build_trainer(quiet).train()
    assert runfolder.read_jsonl(tmp_path / "quiet" / runfolder.ALERTS) == []
