"""CPO's optional parts: the chosen-likelihood anchor (μ), the λ warm-up and the projection step.

Hand calculations for the formulas, and real tiny-model training through the real loop for the
controller and the projection; each part off must leave training exactly as it was.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from preftune.config import validate_config
from preftune.eval.html_report import build_report
from preftune.logprobs import SequenceLogps
from preftune.methods import PairLogps, get_method
from preftune.methods.base import ProjectionSpec
from preftune.methods.cpo import cpo_projection
from preftune.methods.lagrangian import anchor_dual_step, dual_step, warmup_scale
from preftune.run import build_trainer
from preftune.runfolder import read_jsonl
from tests.support import save_tiny_model, tiny_run_config

UNREACHABLE = 5.0  # every pair violates τ early in training (margins ≈ 0)
ALWAYS_MET = -5.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _trainer(tmp_path, model_dir, name="run", *, constraints, training=None, **sections):
    config = tiny_run_config(
        tmp_path / name,
        model_dir,
        method={"loss_type": "cpo", "beta": 0.1, "constraints": {"violation_alert": None, **constraints}},
        training={"max_steps": 4, "eval_steps": 2, **(training or {})},
        **sections,
    )
    return build_trainer(config)


def _lagrangian(trainer):
    return next(c for c in trainer.controllers if c.name == "lagrangian")


def _steps(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _weights(trainer):
    return [p.detach().clone() for p in trainer.trainable]


def _pairs(chosen_sums, chosen_counts, rejected_sums, rejected_counts, *, requires_grad=False) -> PairLogps:
    chosen = torch.tensor(chosen_sums, requires_grad=requires_grad)
    rejected = torch.tensor(rejected_sums, requires_grad=requires_grad)
    return PairLogps(SequenceLogps(chosen, torch.tensor(chosen_counts)), SequenceLogps(rejected, torch.tensor(rejected_counts)))


def _loss(constraints):
    method = validate_config({"method": {"loss_type": "cpo", "beta": 0.1, "constraints": constraints}}).method
    return get_method("cpo").build_loss(method)


# Per-token means: policy chosen [-3, -2], reference chosen [-2.5, -2.5] → δ = [-0.5, +0.5].
# With anchor_tolerance 0.1: anchor hinge = relu(0.5 − 0.1) = 0.4 on pair 0, relu(−0.5 − 0.1) = 0 on pair 1.
POLICY = dict(chosen_sums=[-12.0, -6.0], chosen_counts=[4.0, 3.0], rejected_sums=[-12.0, -6.0], rejected_counts=[4.0, 3.0])
REFERENCE = _pairs([-10.0, -7.5], [4.0, 3.0], [-12.0, -6.0], [4.0, 3.0])


def test_the_anchor_adds_mu_times_the_chosen_likelihood_hinge_and_pulls_the_chosen_answer_up():
    without = _loss({})(_pairs(**POLICY), REFERENCE, lagrange_multiplier=0.0)
    policy = _pairs(**POLICY, requires_grad=True)
    out = _loss({"chosen_anchor": True, "anchor_tolerance": 0.1})(policy, REFERENCE, lagrange_multiplier=0.0, anchor_multiplier=2.0)
    assert out.metrics["constraint/chosen_logp_delta"].tolist() == pytest.approx([-0.5, 0.5])
    assert out.metrics["constraint/anchor_hinge"].tolist() == pytest.approx([0.4, 0.0])
    assert out.metrics["constraint/anchor_violated"].tolist() == [1.0, 0.0]
    assert out.losses.tolist() == pytest.approx([without.losses[0].item() + 2.0 * 0.4, without.losses[1].item()], rel=1e-6)
    out.losses.sum().backward()
    dpo_policy = _pairs(**POLICY, requires_grad=True)
    _loss({})(dpo_policy, REFERENCE, lagrange_multiplier=0.0).losses.sum().backward()
    # d (μ relu(−(sum_c/|c| − ref_c) − tol)) / d sum_c = −μ / |c| on the violating pair (|c| = 4), 0 on the other.
    extra = (policy.chosen.sum.grad - dpo_policy.chosen.sum.grad).tolist()
    assert extra == pytest.approx([-2.0 / 4.0, 0.0], abs=1e-6)
    assert torch.equal(policy.rejected.sum.grad, dpo_policy.rejected.sum.grad)  # the anchor never touches the rejected answer


def test_the_anchor_off_adds_no_term_and_no_metric():
    out = _loss({})(_pairs(**POLICY), REFERENCE, lagrange_multiplier=1.0)
    assert not any("anchor" in key or "chosen_logp_delta" in key for key in out.metrics)


def test_dual_steps_and_warmup_scale_by_hand():
    settings = validate_config(
        {"method": {"loss_type": "cpo", "constraints": {
            "lagrangian_lr": 0.01, "constraint_slack": 0.01, "chosen_anchor": True, "anchor_lr": 0.5, "anchor_slack": 0.1, "anchor_max": 0.3,
        }}}
    ).method.constraints
    assert anchor_dual_step(0.0, 0.3, settings) == pytest.approx(0.1)  # 0.5 · (0.3 − 0.1)
    assert anchor_dual_step(0.25, 1.0, settings) == pytest.approx(0.3)  # step clipped at 0.1, then clamped at anchor_max
    assert anchor_dual_step(0.02, 0.0, settings) == 0.0  # falls by 0.05, stops at 0
    assert dual_step(0.0, 0.3, settings) == pytest.approx(0.01 * (0.3 - 0.01))  # λ keeps its own rate and slack
    assert [warmup_scale(k, 4) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_scale(0, 0) == 1.0


def test_mu_follows_the_anchor_hinge_through_the_loop_and_is_logged_and_exported(tmp_path, model_dir):
    trainer = _trainer(
        tmp_path, model_dir,
        constraints={"margin_threshold": UNREACHABLE, "chosen_anchor": True, "anchor_lr": 1.0, "anchor_slack": 0.0},
    )
    trainer.train()
    lagrangian = _lagrangian(trainer)
    history = lagrangian.history
    settings = trainer.config.method.constraints
    replayed, mu = [], 0.0
    for entry in history:
        assert entry["anchor_multiplier_used"] == mu
        mu = anchor_dual_step(mu, entry["anchor_violation"], settings)
        replayed.append(mu)
    assert [entry["anchor_multiplier"] for entry in history] == replayed
    assert lagrangian.anchor_multiplier == replayed[-1] > 0  # the tiny run lowers some chosen answers: μ rose
    steps = _steps(tmp_path / "run")
    assert [r["lagrangian/anchor_multiplier"] for r in steps] == replayed
    assert [r["constraint/anchor_hinge"] for r in steps] == [e["anchor_violation"] for e in history]
    assert all("constraint/chosen_logp_delta" in r for r in steps)
    assert steps[0]["constraint/chosen_logp_delta"] == pytest.approx(0.0, abs=1e-5)  # policy = reference at step 1
    state = json.loads((tmp_path / "run" / "final" / "lagrangian_state.json").read_text())
    assert state["anchor_multiplier"] == replayed[-1] and state["history"] == history
    summary = build_report(tmp_path / "run").summary.read_text()
    assert f"μ at the end {replayed[-1]:.4g}, peak {max(replayed):.4g}" in summary


def test_the_anchor_at_zero_rate_trains_exactly_like_no_anchor(tmp_path, model_dir):
    plain = _trainer(tmp_path, model_dir, "plain", constraints={"margin_threshold": UNREACHABLE})
    plain.train()
    frozen_mu = _trainer(tmp_path, model_dir, "anchor", constraints={"margin_threshold": UNREACHABLE, "chosen_anchor": True, "anchor_lr": 0.0})
    frozen_mu.train()
    assert all(torch.equal(a, b) for a, b in zip(_weights(plain), _weights(frozen_mu)))
    assert [e["lambda"] for e in _lagrangian(plain).history] == [e["lambda"] for e in _lagrangian(frozen_mu).history]


def test_lambda_warmup_scales_what_the_loss_receives_not_the_dual_variable(tmp_path, model_dir):
    trainer = _trainer(
        tmp_path, model_dir,
        constraints={"margin_threshold": UNREACHABLE, "initial_lambda": 1.0, "lambda_warmup_steps": 2, "lagrangian_lr": 0.01},
    )
    trainer.train()
    history = _lagrangian(trainer).history
    assert [e["lambda_scale"] for e in history] == [0.0, 0.5, 1.0, 1.0]
    lambdas = [1.0]
    for entry in history:
        lambdas.append(dual_step(lambdas[-1], entry["violation"], trainer.config.method.constraints))
    assert [e["lambda"] for e in history] == lambdas[1:]  # the dual variable moves as without the warm-up
    for row, entry in zip(_steps(tmp_path / "run"), history):
        # The step loss is the preference loss + (λ · scale) · mean hinge.
        penalty = row["loss"] - row["loss/preference"]
        assert penalty == pytest.approx(entry["lambda_used"] * entry["lambda_scale"] * row["constraint/hinge"], rel=1e-4, abs=1e-6)
    assert _steps(tmp_path / "run")[0]["loss"] == pytest.approx(_steps(tmp_path / "run")[0]["loss/preference"], abs=1e-7)


def test_projection_lowers_the_violated_fraction_and_stops_once_the_batch_is_feasible(tmp_path, model_dir):
    # τ = 0: a pair violates when the policy ranks it worse than the reference does; one SGD step of the
    # hinge usually fixes the few such pairs of a 4-pair batch.
    steps = 5
    trainer = _trainer(
        tmp_path, model_dir, constraints={"margin_threshold": 0.0, "projection_steps": steps, "projection_lr": 0.05},
        training={"eval_steps": 100},
    )
    trainer.train()
    rows = _steps(tmp_path / "run")
    assert len(rows) == 4
    assert all(r["projection/violated_after"] <= r["projection/violated_before"] for r in rows)
    assert all(r["projection/steps_taken"] <= steps for r in rows)
    projected = [r for r in rows if r["projection/violated_before"] > 0]
    assert projected  # some step left pairs below τ
    for r in rows:
        if r["projection/violated_before"] == 0.0:  # feasible right after the optimiser step: no projection step
            assert r["projection/steps_taken"] == 0
        if r["projection/steps_taken"] < steps:  # it stopped before its budget only because the batch became feasible
            assert r["projection/violated_after"] == 0.0
    assert any(r["projection/violated_after"] < r["projection/violated_before"] for r in projected)
    assert any(0 < r["projection/steps_taken"] < steps and r["projection/violated_after"] == 0.0 for r in rows)
    summary = build_report(tmp_path / "run").summary.read_text()
    taken = sum(r["projection/steps_taken"] for r in rows)
    assert f"- projection: {taken:g} extra step(s) over 4 logged steps" in summary


def test_projection_on_an_already_feasible_batch_and_projection_off_train_exactly_alike(tmp_path, model_dir):
    off = _trainer(tmp_path, model_dir, "off", constraints={"margin_threshold": ALWAYS_MET})
    off.train()
    on = _trainer(tmp_path, model_dir, "on", constraints={"margin_threshold": ALWAYS_MET, "projection_steps": 3})
    on.train()
    assert off.projection is None and cpo_projection(off.config.method) is None
    assert all(torch.equal(a, b) for a, b in zip(_weights(off), _weights(on)))
    assert off.optimizer.state_dict()["state"].keys() == on.optimizer.state_dict()["state"].keys()
    for a, b in zip(off.optimizer.state_dict()["state"].values(), on.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    rows_off, rows_on = _steps(tmp_path / "off"), _steps(tmp_path / "on")
    assert [r["projection/steps_taken"] for r in rows_on] == [0.0] * 4
    assert not any(key.startswith("projection/") for r in rows_off for key in r)


def test_projection_moves_the_weights_but_not_the_adam_moments(tmp_path, model_dir):
    off = _trainer(tmp_path, model_dir, "off", constraints={"margin_threshold": UNREACHABLE}, training={"max_steps": 1})
    off.train()
    on = _trainer(
        tmp_path, model_dir, "on", constraints={"margin_threshold": UNREACHABLE, "projection_steps": 2}, training={"max_steps": 1}
    )
    on.train()
    assert [r["projection/steps_taken"] for r in _steps(tmp_path / "on")] == [2.0]  # τ = 5 is never met
    assert not all(torch.equal(a, b) for a, b in zip(_weights(off), _weights(on)))
    for a, b in zip(off.optimizer.state_dict()["state"].values(), on.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and a["step"] == b["step"]


def test_projection_with_gradient_accumulation_uses_every_micro_batch_of_the_step(tmp_path, model_dir):
    constraints = {"margin_threshold": UNREACHABLE, "projection_steps": 2, "projection_lr": 0.05}
    whole = _trainer(tmp_path, model_dir, "whole", constraints=constraints, training={"max_steps": 2})
    whole.train()
    split = _trainer(
        tmp_path, model_dir, "split", constraints=constraints,
        training={"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    )
    split.train()
    for a, b in zip(_weights(whole), _weights(split)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for rw, rs in zip(_steps(tmp_path / "whole"), _steps(tmp_path / "split")):
        assert rw["projection/violated_before"] == rs["projection/violated_before"]


def test_a_non_finite_projection_gradient_is_never_applied(tmp_path, model_dir):
    reference = _trainer(tmp_path, model_dir, "plain", constraints={"margin_threshold": UNREACHABLE}, training={"max_steps": 1})
    reference.train()
    trainer = _trainer(tmp_path, model_dir, "nan", constraints={"margin_threshold": UNREACHABLE, "projection_steps": 2}, training={"max_steps": 1})
    spec = trainer.projection
    # A real spec whose penalty is finite but whose gradient is not: d sqrt(x)/dx at 0 is inf.
    trainer.projection = ProjectionSpec(
        steps=2, lr=1.0, violated=spec.violated, penalty=lambda p, r: torch.sqrt(spec.penalty(p, r) * 0.0),
    )
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(_weights(reference), _weights(trainer)))
    (row,) = _steps(tmp_path / "nan")
    assert row["projection/steps_taken"] == 0.0 and row["projection/nonfinite"] == 1.0
    assert any(a["kind"] == "nonfinite_projection" for a in read_jsonl(tmp_path / "nan" / "alerts.jsonl"))


def test_a_projection_step_that_makes_the_penalty_non_finite_is_undone_exactly(tmp_path, model_dir):
    one_step = _trainer(tmp_path, model_dir, "one", constraints={"margin_threshold": UNREACHABLE, "projection_steps": 1}, training={"max_steps": 1})
    one_step.train()
    trainer = _trainer(tmp_path, model_dir, "undo", constraints={"margin_threshold": UNREACHABLE, "projection_steps": 3}, training={"max_steps": 1})
    spec, passes = trainer.projection, []

    def finite_once_then_not(policy, reference):  # the third pass (after two applied steps) sees a non-finite penalty
        passes.append(None)
        penalty = spec.penalty(policy, reference)
        return penalty if len(passes) <= 2 else penalty * float("nan")

    trainer.projection = ProjectionSpec(steps=3, lr=spec.lr, violated=spec.violated, penalty=finite_once_then_not)
    trainer.train()
    # Two steps were applied, the second undone: the weights are those after exactly one projection step.
    assert all(torch.equal(a, b) for a, b in zip(_weights(one_step), _weights(trainer)))
    (row,) = _steps(tmp_path / "undo")
    assert row["projection/steps_taken"] == 1.0 and row["projection/nonfinite"] == 1.0


def test_resume_is_exact_with_the_anchor_the_warmup_and_the_projection_on(tmp_path, model_dir):
    settings = dict(
        constraints={
            "margin_threshold": 0.0, "chosen_anchor": True, "anchor_lr": 1.0, "anchor_slack": 0.0,
            "lambda_warmup_steps": 3, "initial_lambda": 0.5, "projection_steps": 2, "projection_lr": 0.05,
        },
        data={"max_train_samples": 12},
        training={"max_steps": None, "num_train_epochs": 2, "eval_steps": 1, "save_steps": 2, "save_total_limit": None},
    )
    straight = _trainer(tmp_path, model_dir, "straight", **settings)
    straight.train()
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    resumed = _trainer(tmp_path, model_dir, "resumed", resume_from="latest", **settings)
    resumed.train()
    assert _lagrangian(resumed).history == _lagrangian(straight).history
    assert _lagrangian(resumed).anchor_multiplier == _lagrangian(straight).anchor_multiplier
    assert [e["lambda_scale"] for e in _lagrangian(straight).history] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(resumed)))

    def comparable(run):
        rows = read_jsonl(tmp_path / run / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k not in ("time", "pairs_per_second")} for r in rows if r["step"] > 2]

    assert comparable("resumed") == comparable("straight")


def test_config_warnings_name_a_slack_that_swallows_the_constraint_and_a_step_that_saturates_the_multiplier(tmp_path):
    from preftune.config_checks import config_warnings

    def warnings(**constraints):
        config = tiny_run_config(tmp_path, tmp_path, method={"loss_type": "cpo", "beta": 0.1, "constraints": constraints})
        return [w for w in config_warnings(config) if "method.constraints" in w]

    assert warnings() == []  # the defaults: hard mode (the slack is a share of pairs), step clip 0.1 against λ max 10
    assert warnings(mode="soft", margin_threshold=0.1, constraint_slack=0.01) == []  # slack τ / 10
    assert warnings(mode="soft", margin_threshold=ALWAYS_MET, constraint_slack=0.01) == []
    (slack,) = warnings(mode="soft", margin_threshold=0.02, constraint_slack=0.01)
    assert "constraint_slack 0.01 is at least half of τ = 0.02" in slack and "plain DPO" in slack
    (clip,) = warnings(lambda_step_clip=0.5, chosen_anchor=True, anchor_max=0.5)
    assert "lambda_step_clip 0.5 ≥ anchor_max 0.5" in clip
    assert len(warnings(lambda_step_clip=2.0, lambda_max=1.0)) == 1


def _projected_weights(tmp_path, model_dir, name: str, processes: int, per_device: int):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from preftune.config import dump_config

    config = tiny_run_config(
        tmp_path / name, model_dir,
        method={"loss_type": "cpo", "beta": 0.1, "constraints": {"margin_threshold": UNREACHABLE, "projection_steps": 2, "projection_lr": 0.05}},
        training={"per_device_train_batch_size": per_device},
    )
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(dump_config(config))
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         "-m", "tests.distributed_projection", str(config_path), str(tmp_path / name)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    return [
        (load_file(tmp_path / f"{name}-rank{rank}.safetensors"), json.loads((tmp_path / f"{name}-rank{rank}.json").read_text()))
        for rank in range(processes)
    ]


def test_two_processes_project_like_one_process_with_the_whole_batch(tmp_path, model_dir):
    ((single, single_metrics),) = _projected_weights(tmp_path, model_dir, "single", processes=1, per_device=4)
    (rank0, metrics0), (rank1, metrics1) = _projected_weights(tmp_path, model_dir, "distributed", processes=2, per_device=2)
    assert single_metrics["projection/steps_taken"] == 2.0
    assert metrics0 == metrics1 == single_metrics  # the same global count of violated pairs on every process
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-6)
