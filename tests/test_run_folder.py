"""The run folder is the contract: exact after crash + resume, never another run's, never the user's files."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune import runfolder
from preftune.cli import main
from preftune.control import Controller
from preftune.control.monitors import TrainingDiverged
from preftune.errors import CheckpointError, PreftuneError, TrainingInterrupted
from preftune.eval.html_report import build_report
from preftune.run import build_trainer
from tests.support import save_tiny_model, tiny_run_config

NONDETERMINISTIC = {"time", "pairs_per_second"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _config(run_dir, model_dir, **training):
    return tiny_run_config(run_dir, model_dir, training={"max_steps": 4, "save_steps": 2, "eval_steps": 1, **training})


class CrashAt(Controller):
    name = "crash"

    def __init__(self, step: int, action=None):
        self.step = step
        self.action = action

    def on_step_end(self, context):
        if context.step == self.step:
            if self.action is None:
                raise RuntimeError("simulated crash")
            self.action()


def _records(run_dir):
    rows = runfolder.read_jsonl(run_dir / runfolder.METRICS)
    return [{k: v for k, v in row.items() if k not in NONDETERMINISTIC} for row in rows]


def test_after_a_crash_and_resume_the_run_folder_equals_an_uninterrupted_runs(tmp_path, model_dir):
    build_trainer(_config(tmp_path / "straight", model_dir)).train()
    crashed = build_trainer(_config(tmp_path / "resumed", model_dir))
    crashed.controllers.append(CrashAt(4))  # step 3 is logged and evaluated; the last checkpoint is step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    assert max(row["step"] for row in runfolder.read_jsonl(tmp_path / "resumed" / runfolder.METRICS)) == 3
    resumed = build_trainer(tiny_run_config(
        tmp_path / "resumed", model_dir, resume_from="latest", training={"max_steps": 4, "save_steps": 2, "eval_steps": 1}
    ))
    resumed.train()

    straight_rows, resumed_rows = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert resumed_rows == straight_rows
    train_steps = [row["step"] for row in resumed_rows if "loss" in row]
    assert train_steps == [1, 2, 3, 4]  # exactly one row per step
    for step in runfolder.evaluation_steps(tmp_path / "straight"):
        assert (runfolder.evaluation_path(tmp_path / "resumed", step).read_bytes()
                == runfolder.evaluation_path(tmp_path / "straight", step).read_bytes())
    assert runfolder.evaluation_steps(tmp_path / "resumed") == [0, 1, 2, 3, 4]
    assert (tmp_path / "resumed" / runfolder.CONTROLLERS).read_bytes() == (tmp_path / "straight" / runfolder.CONTROLLERS).read_bytes()


def test_a_checkpoint_of_another_run_is_refused(tmp_path, model_dir):
    build_trainer(_config(tmp_path / "first", model_dir)).train()
    other = tiny_run_config(
        tmp_path / "first", model_dir, resume_from="latest", method={"loss_type": "sigmoid", "beta": 0.5},
        training={"max_steps": 6, "save_steps": 2, "eval_steps": 1},
    )
    with pytest.raises(CheckpointError, match="belongs to another run.*config_hash"):
        build_trainer(other).train()


def test_overwrite_replaces_the_old_runs_checkpoints_and_records(tmp_path, model_dir):
    build_trainer(_config(tmp_path / "run", model_dir, max_steps=6)).train()
    assert (tmp_path / "run" / "checkpoints" / "step-6").is_dir()
    again = tiny_run_config(tmp_path / "run", model_dir, overwrite_output_dir=True, training={"max_steps": 2, "eval_steps": 1})
    build_trainer(again).train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2"]
    assert max(row["step"] for row in runfolder.read_jsonl(tmp_path / "run" / runfolder.METRICS)) == 2
    assert runfolder.evaluation_steps(tmp_path / "run") == [0, 1, 2]


def test_a_folder_of_the_users_files_is_refused_and_never_deleted_from(tmp_path, model_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "config.yaml").write_text("my: own\n")
    with pytest.raises(PreftuneError, match="not a preftune run.*notes.txt"):
        build_trainer(_config(folder, model_dir)).train()
    assert (folder / "config.yaml").read_text() == "my: own\n"
    build_trainer(tiny_run_config(folder, model_dir, overwrite_output_dir=True, training={"max_steps": 1})).train()
    assert (folder / "notes.txt").read_text() == "keep me"


def test_a_nonfinite_gradient_is_skipped_counted_and_never_applied(tmp_path, model_dir):
    trainer = build_trainer(_config(tmp_path / "run", model_dir, max_steps=2, save_steps=None))
    poisoned = trainer.trainable[0]
    calls = []

    def poison_first_step(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 1 else grad

    poisoned.register_hook(poison_first_step)
    before = poisoned.detach().clone()
    trainer.controllers.append(CrashAt(1, action=lambda: calls.append(torch.equal(poisoned.detach(), before))))
    trainer.train()
    assert calls[1] is True  # after step 1 the weights are exactly the initial ones
    assert all(torch.isfinite(p).all() for p in trainer.trainable)
    alerts = runfolder.read_jsonl(tmp_path / "run" / runfolder.ALERTS)
    assert [a["kind"] for a in alerts if a["kind"].startswith("nonfinite")] == ["nonfinite_step"]
    steps = [row for row in runfolder.read_jsonl(tmp_path / "run" / runfolder.METRICS) if "loss" in row]
    assert steps[0]["nonfinite/skipped_steps"] == 1.0


def test_persistent_nonfinite_gradients_stop_the_run_and_say_where_the_good_checkpoint_is(tmp_path, model_dir):
    trainer = build_trainer(_config(tmp_path / "run", model_dir, max_steps=6, save_steps=2, max_consecutive_nonfinite_steps=1))
    step = {"n": 0}

    def poison_from_step_3(grad):
        step["n"] += 1
        return grad * float("inf") if step["n"] > 2 else grad

    trainer.trainable[0].register_hook(poison_from_step_3)
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row.*checkpoints/step-2, holds finite weights"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2"]


def test_ctrl_c_writes_a_checkpoint_at_the_step_boundary_and_resumes_exactly(tmp_path, model_dir):
    straight = build_trainer(_config(tmp_path / "straight", model_dir, save_steps=None))
    straight.train()
    interrupted = build_trainer(_config(tmp_path / "run", model_dir, save_steps=None))
    interrupted.controllers.append(CrashAt(1, action=lambda: os.kill(os.getpid(), signal.SIGINT)))
    with pytest.raises(TrainingInterrupted, match="SIGINT: stopped after step 1 of 4.*resume_from=latest"):
        interrupted.train()
    assert (tmp_path / "run" / "checkpoints" / "step-1").is_dir()
    resumed = build_trainer(tiny_run_config(
        tmp_path / "run", model_dir, resume_from="latest", training={"max_steps": 4, "save_steps": None, "eval_steps": 1}
    ))
    resumed.train()
    for (name, a), (_, b) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), name
    assert _records(tmp_path / "run") == _records(tmp_path / "straight")


def test_killed_checkpoint_writes_are_cleaned_and_outputs_follow_the_umask(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        build_trainer(_config(run_dir, model_dir, max_steps=2, save_steps=1)).train()
        stale = [run_dir / "checkpoints" / ".step-3.tmp-abcd", run_dir / "final" / ".merged.tmp-efgh"]
        for folder in stale:
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half")
        again = tiny_run_config(run_dir, model_dir, resume_from="latest", training={"max_steps": 2, "save_steps": 1, "eval_steps": 1})
        build_trainer(again).train()
    finally:
        os.umask(previous)
    assert not any(folder.exists() for folder in stale)
    merged = run_dir / "final" / "merged"
    assert stat.S_IMODE(merged.stat().st_mode) == 0o755
    assert stat.S_IMODE((merged / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((run_dir / "checkpoints" / "step-2").stat().st_mode) == 0o755
    assert stat.S_IMODE((run_dir / runfolder.CONFIG).stat().st_mode) == 0o644


def test_report_rebuilds_the_summary_from_the_folder_alone(tmp_path, model_dir, capsys):
    config = tiny_run_config(tmp_path / "run", model_dir, method={"loss_type": "cpo", "constraints": {"margin_threshold": 5.0}})
    result = build_trainer(config).train()
    written = build_report(result.run_dir).summary.read_text()
    (tmp_path / "run" / "summary.md").unlink()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "summary.md").read_text() == written
    assert "## CPO constraint (constrained DPO)" in written
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "not a preftune run folder" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_the_recorded_peak_rss_is_the_runs_own_not_its_launchers(tmp_path):
    """run.json's peak_rss_gb: a process started by a large parent reports its own peak, not the parent's
    (getrusage's ru_maxrss would carry the parent's high-water mark across fork and exec)."""
    ballast = bytearray(1 << 30)  # 1 GiB the parent really holds: every page written
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    parent_rss = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    probe = "from preftune.train.trainer import peak_rss_gb; print(peak_rss_gb())"
    own = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert parent_rss / (1 << 20) > 1.0
    assert 0.0 < own < parent_rss / (1 << 20) - 0.5  # importing preftune and torch: a few hundred MB, not the parent's GB
