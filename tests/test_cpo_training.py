"""CPO (constrained DPO) in the trainer: λ's dual steps, per-epoch reset, exact resume, export, and the LR cut."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from preftune.eval.html_report import build_report
from preftune.run import build_trainer
from preftune.methods.lagrangian import dual_step
from preftune.runfolder import read_jsonl as read_metrics
from tests.support import save_tiny_model, tiny_run_config

# Early in training policy ≈ reference, so per-pair margins are near 0: τ = 5 is violated by every pair,
# τ = −5 by none.
UNREACHABLE = 5.0
ALWAYS_MET = -5.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


SOFT_MODE = {"mode": "soft", "margin_threshold": 0.1, "lagrangian_lr": 0.01, "constraint_slack": 0.01}


def _cpo_trainer(tmp_path, model_dir, name="run", *, constraints, training=None, **sections):
    config = tiny_run_config(
        tmp_path / name,
        model_dir,
        # These tests were written against soft mode (λ follows the mean hinge); the library default is hard mode.
        method={"loss_type": "cpo", "beta": 0.1, "constraints": {**SOFT_MODE, "violation_alert": None, **constraints}},
        training={"max_steps": 4, "eval_steps": 2, **(training or {})},
        **sections,
    )
    return build_trainer(config)


def _controller(trainer, name="lagrangian"):
    return next(c for c in trainer.controllers if c.name == name)


def _replay(history, settings, start):
    """λ after each step, recomputed from the logged violations with the dual-step rule alone."""
    multiplier, replayed = start, []
    for entry in history:
        multiplier = dual_step(multiplier, entry["violation"], settings)
        replayed.append(multiplier)
    return replayed


def test_lambda_rises_while_margins_are_below_the_threshold(tmp_path, model_dir):
    trainer = _cpo_trainer(tmp_path, model_dir, constraints={"margin_threshold": UNREACHABLE, "lagrangian_lr": 0.01})
    assert type(_controller(trainer).loss_inputs()["lagrange_multiplier"]) is float  # a plain number, not a tensor the optimiser could own
    trainer.train()
    history = _controller(trainer).history
    settings = trainer.config.method.constraints
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    assert all(entry["violation"] > 4.0 for entry in history)  # soft: mean relu(τ − margin) with margins ≈ 0
    lambdas = [entry["lambda"] for entry in history]
    assert lambdas == pytest.approx(_replay(history, settings, 0.0), abs=0)
    assert all(later > earlier for earlier, later in zip([0.0, *lambdas], lambdas))
    # Only the dual step moves λ: the loss of every step used the λ the previous step left.
    assert [entry["lambda_used"] for entry in history] == [0.0, *lambdas[:-1]]


def test_lambda_stays_zero_when_every_margin_is_above_the_threshold(tmp_path, model_dir):
    trainer = _cpo_trainer(tmp_path, model_dir, constraints={"margin_threshold": ALWAYS_MET, "lagrangian_lr": 1.0})
    trainer.train()
    history = _controller(trainer).history
    assert [entry["violation"] for entry in history] == [0.0] * 4
    assert [entry["lambda"] for entry in history] == [0.0] * 4


def test_lambda_falls_back_to_zero_once_the_constraint_holds_and_never_goes_negative(tmp_path, model_dir):
    # With the constraint met, the violation is 0 and the step is −η · slack: λ walks down to 0 and stops there.
    trainer = _cpo_trainer(
        tmp_path,
        model_dir,
        constraints={
            "margin_threshold": ALWAYS_MET,
            "initial_lambda": 0.25,
            "lagrangian_lr": 1.0,
            "constraint_slack": 0.1,
            "reset_lambda_each_epoch": False,
        },
        training={"max_steps": 5},
    )
    trainer.train()
    assert [entry["lambda"] for entry in _controller(trainer).history] == pytest.approx([0.15, 0.05, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_lambda_never_moves_more_than_the_step_clip(tmp_path, model_dir, mode):
    trainer = _cpo_trainer(
        tmp_path,
        model_dir,
        constraints={"margin_threshold": UNREACHABLE, "mode": mode, "lagrangian_lr": 1.0, "lambda_step_clip": 0.15},
    )
    trainer.train()
    history = _controller(trainer).history
    # hard: the fraction of pairs below τ (all of them); soft: the mean hinge, far above 1.
    assert all(entry["violation"] == 1.0 for entry in history) if mode == "hard" else all(e["violation"] > 4 for e in history)
    assert [entry["lambda"] for entry in history] == pytest.approx([0.15, 0.30, 0.45, 0.60])


@pytest.mark.parametrize("reset", [True, False])
def test_lambda_resets_to_its_initial_value_at_every_epoch(tmp_path, model_dir, reset):
    trainer = _cpo_trainer(
        tmp_path,
        model_dir,
        constraints={"margin_threshold": UNREACHABLE, "initial_lambda": 0.2, "reset_lambda_each_epoch": reset},
        data={"max_train_samples": 8},  # 2 steps of 4 pairs per epoch
        training={"max_steps": None, "num_train_epochs": 2},
    )
    trainer.train()
    history = _controller(trainer).history
    used = [entry["lambda_used"] for entry in history]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    assert used[0] == 0.2 and used[1] > 0.2 and used[3] > used[2]
    if reset:
        assert used[2] == 0.2  # the first step of the second epoch starts again from initial_lambda
    else:
        assert used[2] == history[1]["lambda"] > 0.2


def _comparable(records, after_step):
    """Logged numbers after the checkpoint, without wall-clock ones."""
    return [
        {k: v for k, v in r.items() if k not in ("time", "pairs_per_second")} for r in records if r["step"] > after_step
    ]


def test_resume_reproduces_lambda_its_history_the_lr_cuts_weights_and_metrics_exactly(tmp_path, model_dir):
    # 12 pairs at 4 per step: 3 steps per epoch, 2 epochs; the checkpoint at step 2 is mid-epoch, so the
    # epoch-1 reset of λ and the LR rule's count of violating evaluations both cross the interruption.
    settings = dict(
        constraints={"margin_threshold": UNREACHABLE, "lagrangian_lr": 0.02, "violation_alert": 0.0, "patience": 2},
        data={"max_train_samples": 12},
        training={"max_steps": None, "num_train_epochs": 2, "eval_steps": 1, "save_steps": 2, "save_total_limit": None},
    )
    straight = _cpo_trainer(tmp_path, model_dir, "straight", **settings)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-2"
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / "step-2")
    resumed = _cpo_trainer(tmp_path, model_dir, "resumed", resume_from="latest", **settings)
    resumed.train()

    assert resumed.state.global_step == straight.state.global_step == 6
    assert _controller(resumed).history == _controller(straight).history
    assert _controller(resumed).multiplier == _controller(straight).multiplier > 0
    assert _controller(resumed, "constraint_violation_lr").state_dict() == _controller(straight, "constraint_violation_lr").state_dict()
    assert _controller(straight, "constraint_violation_lr").reductions  # the LR rule really acted in this run
    for (name, a), (_, b) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), name
    for log in ("metrics.jsonl", "alerts.jsonl"):
        assert _comparable(read_metrics(tmp_path / "resumed" / log), 2) == _comparable(read_metrics(tmp_path / "straight" / log), 2)
    exported = [json.loads((tmp_path / run / "final" / "lagrangian_state.json").read_text()) for run in ("straight", "resumed")]
    assert exported[0] == exported[1]


def test_the_final_lagrangian_state_is_exported_next_to_the_model_and_reported(tmp_path, model_dir):
    trainer = _cpo_trainer(tmp_path, model_dir, constraints={"margin_threshold": UNREACHABLE, "temperature": 2.0})
    result = trainer.train()
    summary = build_report(result.run_dir).summary.read_text()
    history = _controller(trainer).history
    assert f"λ at the end: {history[-1]['lambda']:.4g}" in summary
    assert f"λ peaked at {max(e['lambda'] for e in history):.4g}" in summary
    assert "| pairs below the CPO margin threshold τ | 1.0000 | 1.0000 |" in summary
    assert "validation loss (includes λ · hinge)" in summary and "not judged" in summary
    assert (tmp_path / "run" / "plots" / "cpo_curves.png").is_file()
    state = json.loads((tmp_path / "run" / "final" / "lagrangian_state.json").read_text())
    assert (tmp_path / "run" / "final" / "adapter").is_dir()
    assert state["lambda"] == _controller(trainer).multiplier > 0
    assert state["threshold"] == UNREACHABLE / 2.0  # temperature-scaled τ
    assert state["monitored_metric"] == "constraint/hinge"
    assert state["settings"]["margin_threshold"] == UNREACHABLE
    assert state["history"] == _controller(trainer).history


def test_sustained_validation_violation_lowers_the_learning_rate_by_the_configured_fraction(tmp_path, model_dir):
    trainer = _cpo_trainer(
        tmp_path,
        model_dir,
        constraints={"margin_threshold": UNREACHABLE, "violation_alert": 0.0, "patience": 1, "lr_reduction": 0.2},
        training={"max_steps": 2, "eval_steps": 1, "lr_scheduler_type": "constant", "learning_rate": 1e-3},
    )
    trainer.train()
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # Evaluated after step 1 with every validation pair below τ: the LR of step 2 is 20% lower, and again after step 2.
    assert [r["learning_rate"] for r in steps] == pytest.approx([1e-3, 8e-4])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(6.4e-4)
    alerts = [a for a in read_metrics(tmp_path / "run" / "alerts.jsonl") if a["kind"] == "constraint_violation_lr"]
    assert [(a["step"], a["kind"]) for a in alerts] == [(1, "constraint_violation_lr"), (2, "constraint_violation_lr")]
    assert "learning rate lowered by 20%" in alerts[0]["message"]


def test_a_constraint_swallowed_by_the_slack_is_said_aloud(tmp_path, model_dir):
    trainer = _cpo_trainer(
        tmp_path, model_dir, constraints={"margin_threshold": 0.001, "constraint_slack": 1.0, "lagrangian_lr": 0.01},
        training={"max_steps": 2, "eval_steps": 1},
    )
    result = trainer.train()
    assert all(entry["lambda"] == 0.0 for entry in _controller(trainer).history)
    alerts = [a for a in read_metrics(tmp_path / "run" / "alerts.jsonl") if a["kind"] == "constraint_inactive"]
    assert len(alerts) == 1 and "trained as plain DPO" in alerts[0]["message"]
    assert "the constraint never acted" in build_report(result.run_dir).summary.read_text()
