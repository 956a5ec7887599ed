"""Epoch restarts through the real loop: a controller's request rolls the epoch back to its start, bit for bit,
and trains it again; CPO's rule (method.constraints.max_epoch_restarts) tightens λ's step each time."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from preftune import runfolder
from preftune.control import Controller, StepContext
from preftune.eval.html_report import build_report
from preftune.methods.cpo import ConstraintSettings
from preftune.methods.lagrangian import LagrangianController, dual_step
from preftune.run import build_trainer
from preftune.train.checkpoint import list_checkpoints
from tests.support import save_tiny_model, tiny_run_config

NONDETERMINISTIC = {"time", "pairs_per_second"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


class RestartOnce(Controller):
    """Requests one restart of epoch `epoch`; its own state says whether it did, so the request is not repeated."""

    name = "restart_once"

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.done = False

    @property
    def may_request_epoch_restart(self) -> bool:
        return not self.done

    def on_evaluate(self, context, summary):
        if context.epoch_end and not self.done and context.epoch == self.epoch + 1:
            context.request_epoch_restart("test", accuracy=summary["eval/rewards/accuracies"])

    def on_epoch_restart(self, context):
        self.done = True

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = state["done"]


class Watch(Controller):
    """Copies the trainable weights and the optimiser's moments at every epoch start and every epoch-end evaluation."""

    name = "watch"

    def __init__(self, trainer):
        self.trainer = trainer
        self.epoch_starts: list[tuple[int, dict, dict]] = []
        self.epoch_ends: list[tuple[int, dict]] = []

    def _weights(self):
        return {n: p.detach().clone() for n, p in self.trainer.policy.named_parameters() if p.requires_grad}

    def on_epoch_start(self, context):
        moments = {
            (i, k): v.clone() for i, s in self.trainer.optimizer.state_dict()["state"].items()
            for k, v in s.items() if isinstance(v, torch.Tensor)
        }
        self.epoch_starts.append((context.step, self._weights(), moments))

    def on_evaluate(self, context, summary):
        if context.epoch_end:
            self.epoch_ends.append((context.step, self._weights()))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run_dir, name=runfolder.METRICS):
    return [{k: v for k, v in row.items() if k not in NONDETERMINISTIC} for row in runfolder.read_jsonl(run_dir / name)]


def _dpo_config(run_dir, model_dir, **overrides):
    # 8 pairs at 4 per step: 2 steps per epoch, 3 epochs; evaluated at every epoch end by eval_steps.
    return tiny_run_config(
        run_dir, model_dir, data={"max_train_samples": 8},
        training={"max_steps": None, "num_train_epochs": 3, "eval_steps": 2, "save_steps": None, **overrides},
    )


@pytest.mark.parametrize("epoch", [1, 2])  # a middle epoch, and the last (its end is the run's last step)
def test_a_restarted_epoch_starts_from_the_bit_identical_state_and_the_folder_equals_a_run_without_it(tmp_path, model_dir, epoch):
    plain = build_trainer(_dpo_config(tmp_path / "plain", model_dir))
    plain.train()
    restarted = build_trainer(_dpo_config(tmp_path / "restarted", model_dir))
    watch = Watch(restarted)
    restarted.controllers += [RestartOnce(epoch=epoch), watch]
    restarted.train()
    start, end = 2 * epoch, 2 * epoch + 2

    # The epoch started twice, from the same weights and optimiser moments (non-empty by then).
    assert [step for step, _, _ in watch.epoch_starts] == sorted([0, 2, 4, start])
    (_, weights_a, moments_a), (_, weights_b, moments_b) = watch.epoch_starts[epoch : epoch + 2]
    assert moments_a and _equal(weights_a, weights_b) and _equal(moments_a, moments_b)
    assert not _equal(weights_a, watch.epoch_starts[0][1])  # the earlier epochs did train
    # Nothing else changed, so the retrained epoch ends where the abandoned attempt ended, bit for bit.
    assert [step for step, _ in watch.epoch_ends] == sorted([2, 4, 6, end])
    assert _equal(watch.epoch_ends[epoch][1], watch.epoch_ends[epoch + 1][1])
    for (name, a), (_, b) in zip(plain.policy.named_parameters(), restarted.policy.named_parameters()):
        assert torch.equal(a, b), name
    assert restarted.state.global_step == 6 and restarted.state.epoch_restarts == 1

    # The abandoned attempt's records were rolled back: one row per step, the same numbers as the plain run.
    assert _rows(tmp_path / "restarted") == _rows(tmp_path / "plain")
    assert runfolder.evaluation_steps(tmp_path / "restarted") == [0, 2, 4, 6]
    for step in (0, 2, 4, 6):
        assert (runfolder.evaluation_path(tmp_path / "restarted", step).read_bytes()
                == runfolder.evaluation_path(tmp_path / "plain", step).read_bytes())
    alerts = _rows(tmp_path / "restarted", runfolder.ALERTS)
    restarts = [a for a in alerts if a["kind"] == "epoch_restart"]
    assert [(a["step"], a["epoch"], a["restart"], a["abandoned_step"]) for a in restarts] == [(start, epoch, 1, end)]
    assert restarts[0]["message"].startswith(f"epoch {epoch} restarted from step {start} (restart 1): test")
    assert [a for a in alerts if a["kind"] != "epoch_restart"] == _rows(tmp_path / "plain", runfolder.ALERTS)
    assert "**epoch_restart**" in build_report(tmp_path / "restarted").summary.read_text()


def test_with_no_controller_asking_no_epoch_checkpoint_or_evaluation_is_added(tmp_path, model_dir):
    trainer = build_trainer(_dpo_config(tmp_path / "run", model_dir, eval_steps=None))
    assert not any(c.may_request_epoch_restart for c in trainer.controllers)
    trainer.train()
    assert runfolder.evaluation_steps(tmp_path / "run") == [0, 6]  # before the first and after the last step only
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-6"]


# ---- CPO's rule ---------------------------------------------------------------------------------------------

def _cpo_config(run_dir, model_dir, *, constraints, **top):
    return tiny_run_config(
        run_dir, model_dir,
        method={"loss_type": "cpo", "beta": 0.1, "constraints": {
            "violation_alert": None, "mode": "soft", "constraint_slack": 0.01, "margin_threshold": 0.1, "lagrangian_lr": 1.0,
            "lambda_step_clip": 0.15, **constraints,
        }},
        data={"max_train_samples": 8},  # 2 steps per epoch
        training={"max_steps": None, "num_train_epochs": 2, "eval_steps": None, "save_steps": None},
        **top,
    )


def _lagrangian(trainer):
    return next(c for c in trainer.controllers if c.name == "lagrangian")


# After one epoch of the tiny model some validation pair always has a negative per-token margin, so a threshold
# of 0 triggers at every epoch end (the test checks that it did).
CERTAIN = {"restart_negative_margin_threshold": 0.0}


def test_cpo_restarts_exactly_the_configured_number_of_times_and_tightens_lambdas_step(tmp_path, model_dir):
    trainer = build_trainer(_cpo_config(tmp_path / "run", model_dir, constraints={"max_epoch_restarts": 2, **CERTAIN}))
    trainer.train()
    alerts = [a for a in runfolder.read_jsonl(tmp_path / "run" / runfolder.ALERTS) if a["kind"] == "epoch_restart"]
    # Both restarts are of epoch 0 (the budget is spent there), each halving η and the clip again.
    assert [(a["step"], a["epoch"], a["restart"], a["abandoned_step"]) for a in alerts] == [(0, 0, 1, 2), (0, 0, 2, 2)]
    assert all(a["negative_margin_fraction_per_token"] > 0.0 for a in alerts)
    assert [(a["lagrangian_lr"], a["lambda_step_clip"]) for a in alerts] == [(0.5, 0.075), (0.25, 0.0375)]
    assert "negative per-token margin" in alerts[0]["message"] and "lagrangian_lr 0.5" in alerts[0]["message"]
    lagrangian = _lagrangian(trainer)
    assert lagrangian.epoch_restarts == 2 and lagrangian.step_scale == 0.25
    assert trainer.state.global_step == 4 and trainer.state.epoch_restarts == 2
    # Every kept step of λ took the dual step at a quarter of η and of the clip (λ reset at the epoch start).
    settings = trainer.config.method.constraints
    history = lagrangian.history
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    expected, multiplier = [], 0.0
    for entry in history:
        multiplier = 0.0 if entry["step"] == 3 else multiplier
        multiplier = dual_step(multiplier, entry["violation"], settings, step_scale=0.25)
        expected.append(multiplier)
    assert [entry["lambda"] for entry in history] == expected
    assert expected[0] == pytest.approx(0.25 * 1.0 * (history[0]["violation"] - settings.constraint_slack))
    assert [r["lagrangian/step_scale"] for r in _rows(tmp_path / "run") if "lagrangian/step_scale" in r] == [0.5, 0.25]
    assert [row["step"] for row in _rows(tmp_path / "run") if "loss" in row] == [1, 2, 3, 4]
    # The exported state carries the tightened step, and the report still builds from the folder.
    assert (tmp_path / "run" / "final" / "lagrangian_state.json").is_file()
    summary = build_report(tmp_path / "run").summary.read_text()
    assert "epoch 0 restarted from step 0 (restart 2)" in summary
    assert "- epochs restarted: 2 (the `epoch_restart` alerts say why); λ's step since: 0.25 × lagrangian_lr" in summary


def test_cpo_rule_off_by_default_leaves_the_run_unchanged(tmp_path, model_dir):
    trainer = build_trainer(_cpo_config(tmp_path / "run", model_dir, constraints={}))
    assert trainer.config.method.constraints.max_epoch_restarts == 0
    trainer.train()
    assert not [a for a in runfolder.read_jsonl(tmp_path / "run" / runfolder.ALERTS) if a["kind"] == "epoch_restart"]
    assert runfolder.evaluation_steps(tmp_path / "run") == [0, 4]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-4"]
    assert _lagrangian(trainer).step_scale == 1.0


def test_a_resume_after_a_restart_keeps_the_tightened_step_and_equals_the_uninterrupted_run(tmp_path, model_dir):
    constraints = {"max_epoch_restarts": 1, **CERTAIN}
    straight = build_trainer(_cpo_config(tmp_path / "straight", model_dir, constraints=constraints))
    straight.train()
    # The crashed run restarts epoch 0 (checkpointing step 0 again, tightened), then dies in epoch 1.
    crashed = build_trainer(_cpo_config(tmp_path / "resumed", model_dir, constraints=constraints))

    class CrashAt(Controller):
        name = "crash"

        def on_step_end(self, context):
            if context.step == 3:
                raise RuntimeError("simulated crash")

    crashed.controllers.append(CrashAt())
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0"]
    resumed = build_trainer(_cpo_config(tmp_path / "resumed", model_dir, constraints=constraints, resume_from="latest"))
    assert _lagrangian(resumed).step_scale == 1.0
    resumed.train()

    assert _lagrangian(resumed).step_scale == _lagrangian(straight).step_scale == 0.5
    assert _lagrangian(resumed).history == _lagrangian(straight).history
    for (name, a), (_, b) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), name
    for name in (runfolder.METRICS, runfolder.ALERTS):
        assert _rows(tmp_path / "resumed", name) == _rows(tmp_path / "straight", name)
    assert [a["kind"] for a in _rows(tmp_path / "resumed", runfolder.ALERTS)].count("epoch_restart") == 1
    assert runfolder.evaluation_steps(tmp_path / "resumed") == runfolder.evaluation_steps(tmp_path / "straight")


def test_a_restart_without_its_epoch_start_checkpoint_says_which_is_missing(tmp_path, model_dir):
    trainer = build_trainer(_dpo_config(tmp_path / "run", model_dir))
    trainer.controllers.append(RestartOnce(epoch=0))

    class RemoveEpochStart(Controller):
        name = "remove"

        def on_step_end(self, context):
            shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0", ignore_errors=True)

    trainer.controllers.append(RemoveEpochStart())
    with pytest.raises(Exception, match=r"epoch-start checkpoint .*step-0, which is missing"):
        trainer.train()


def _judged(controller, summary, *, epoch_end=True):
    context = StepContext(step=4, total_steps=8, epoch=1, epoch_end=epoch_end)
    controller.on_evaluate(context, summary)
    return context.epoch_restart


def test_cpo_rule_fires_on_an_accuracy_drop_or_too_many_negative_per_token_margins_and_nothing_else():
    settings = ConstraintSettings.model_validate({"max_epoch_restarts": 1, "lagrangian_lr": 0.02, "constraint_slack": 0.01})
    controller = LagrangianController(settings, threshold=settings.threshold)
    at_start = {"eval/rewards/accuracies": 0.75, "eval/negative_margin_fraction_per_token": 0.125}
    assert _judged(controller, at_start, epoch_end=True) is None  # no baseline before the first epoch start
    controller.on_epoch_start(StepContext(step=0, total_steps=8, epoch=0))
    assert controller.epoch_baseline == 0.75

    assert _judged(controller, {**at_start}) is None  # equal accuracy, 12.5% ≤ 15%
    # Exactly at the threshold is not above it; the summed-margin fraction is not what the rule watches.
    assert _judged(controller, {**at_start, "eval/negative_margin_fraction_per_token": 0.15, "eval/negative_margin_fraction": 0.9}) is None
    dropped = _judged(controller, {**at_start, "eval/rewards/accuracies": 0.625})
    assert dropped["accuracy"] == 0.625 and dropped["baseline_accuracy"] == 0.75
    assert "accuracy fell from 0.750 at the epoch's start to 0.625" in dropped["reason"]
    assert (dropped["lagrangian_lr"], dropped["lambda_step_clip"]) == (0.01, 0.05)  # × 0.5 of 0.02 and 0.1
    negative = _judged(controller, {**at_start, "eval/negative_margin_fraction_per_token": 0.25})
    assert "25.0% of validation pairs have a negative per-token margin (> 15.0%)" in negative["reason"]
    # Only at an epoch's end, and only while the budget lasts.
    assert _judged(controller, {**at_start, "eval/rewards/accuracies": 0.5}, epoch_end=False) is None
    controller.on_epoch_restart(StepContext(step=0, total_steps=8, epoch=0))
    assert (controller.epoch_restarts, controller.step_scale) == (1, 0.5)
    assert not controller.may_request_epoch_restart
    assert _judged(controller, {**at_start, "eval/rewards/accuracies": 0.5}) is None
    # The tightened step is state: it survives a checkpoint round trip and a resumed controller uses it.
    restored = LagrangianController(settings, threshold=settings.threshold)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert (restored.step_scale, restored.epoch_restarts, restored.epoch_baseline) == (0.5, 1, 0.75)
    assert dual_step(0.0, 1.0, settings, step_scale=restored.step_scale) == pytest.approx(0.5 * 0.02 * (1.0 - 0.01))


def test_a_restart_cannot_be_requested_outside_the_evaluation_that_closes_an_epoch():
    with pytest.raises(RuntimeError, match="closes an epoch"):
        StepContext(step=1, total_steps=2, epoch=0).request_epoch_restart("too early")
