"""`preftune sweep`: one short run per value, then a table, a CSV and a plot in the run folder."""

from __future__ import annotations

import csv

import pytest
import yaml

from preftune.cli import main
from preftune.errors import ConfigError
from preftune.sweep import SweepRow, parse_values, recommend
from tests.support import save_tiny_model


def test_sweep_over_beta_writes_table_csv_and_plot(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny-model")
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir), "lora": {"r": 4, "alpha": 8}},
        "data": {"max_train_samples": 4, "max_validation_samples": 4, "max_length": 96, "max_prompt_length": 64},
        "training": {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "max_steps": 2, "eval_steps": 2, "report_to": ["jsonl"]},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["sweep", "--config", str(tmp_path / "run.yaml"), "--param", "beta", "--values", "0.1,0.5"]) == 0

    run = tmp_path / "run"
    for beta in (0.1, 0.5):
        resolved = yaml.safe_load((run / "sweep-beta" / f"beta-{beta}" / "config.yaml").read_text(encoding="utf-8"))
        assert resolved["method"]["beta"] == beta
    rows = list(csv.DictReader((run / "sweep-beta.csv").read_text(encoding="utf-8").splitlines()))
    assert [row["beta"] for row in rows] == ["0.1", "0.5"]
    for row in rows:
        assert 0.0 <= float(row["eval/rewards/accuracies"]) <= 1.0
        assert float(row["eval/rewards/margins"]) == float(row["eval/rewards/margins"])  # a number, not NaN
    table = (run / "sweep-beta.md").read_text(encoding="utf-8")
    assert "| 0.1" in table and "| 0.5" in table and "Recommended: **beta = " in table
    assert (run / "plots" / "sweep-beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweep done" in capsys.readouterr().err


def test_recommendation_prefers_accuracy_then_the_log_prob_gap(tmp_path):
    rows = [
        SweepRow(0.05, tmp_path, {"eval/rewards/accuracies": 0.6, "logps_gap": 0.9, "eval/rewards/margins": 0.1}),
        SweepRow(0.1, tmp_path, {"eval/rewards/accuracies": 0.7, "logps_gap": 0.1, "eval/rewards/margins": 0.2}),
        SweepRow(0.5, tmp_path, {"eval/rewards/accuracies": 0.7, "logps_gap": 0.3, "eval/rewards/margins": 0.05}),
    ]
    assert recommend(rows).value == 0.5


def test_values_parse_as_yaml_and_must_be_distinct():
    assert parse_values("0.05, 0.1,ipo") == [0.05, 0.1, "ipo"]
    with pytest.raises(ConfigError, match="repeats"):
        parse_values("0.1,0.1")
