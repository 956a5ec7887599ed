"""The `preftune` command line, end to end on the tiny model."""

from __future__ import annotations

import json

import yaml

from preftune.cli import main
from preftune.config import DEFAULT_CONFIG_PATH
from tests.support import save_tiny_model, tiny_run_config


def test_train_command_writes_a_complete_run_folder(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    config = tiny_run_config(tmp_path / "ignored", model_dir)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    run_dir = tmp_path / "run"

    assert main(["train", "--config", str(config_path), "--output-dir", str(run_dir), "--set", "method.beta=0.2"]) == 0

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["method"]["beta"] == 0.2 and resolved["output_dir"] == str(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 2, 4]
    for produced in [
        "summary.md",
        "data_report.txt",
        "plots/margins.png",
        "plots/training_curves.png",
        "report.html",
        "final/adapter/adapter_model.safetensors",
        "final/merged/model.safetensors",
        "checkpoints/step-4/trainable.safetensors",
    ]:
        assert (run_dir / produced).is_file(), produced
    assert list((run_dir / "tensorboard").glob("events.*")) == []  # report_to: [jsonl] in the tiny config
    summary = (run_dir / "summary.md").read_text()
    assert "preference accuracy" in summary and "log p(rejected) per token" in summary
    # A fresh LoRA adapter leaves policy == reference: every margin is 0 before training, which ranks nothing.
    assert "| preference accuracy | all tied |" in summary and "chance 0.5" in summary


def test_config_errors_name_the_key_and_exit_without_a_traceback(tmp_path, capsys):
    config_path = tmp_path / "bad.yaml"
    config_path.write_text("training:\n  learning_rat: 1e-5\nmethod:\n  beta: -1\n")
    assert main(["config", "--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert "training.learning_rat" in err and "unknown key" in err
    assert "method.beta" in err
    assert "Traceback" not in err


def test_config_command_prints_library_defaults_with_descriptions_not_the_demo():
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "preftune.cli", "config", *args], capture_output=True, text=True, check=True).stdout

    defaults = run()
    resolved = yaml.safe_load(defaults)
    assert resolved["model"]["name_or_path"] == "smollm2-135m"
    assert resolved["method"] == {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0}
    assert "# β: strength of the preference term" in defaults
    cpo = yaml.safe_load(run("--method", "cpo"))
    assert cpo["method"]["loss_type"] == "cpo" and cpo["method"]["constraints"]["margin_threshold"] == 0.01
    demo = yaml.safe_load(run("--config", str(DEFAULT_CONFIG_PATH)))
    assert demo["method"]["loss_type"] == "cpo" and demo["data"]["max_train_samples"] == 384
