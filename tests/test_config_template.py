"""The design's `preference_training:` template: loads as written, maps every key, and trains with only paths changed."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.config import load_config
from preftune.errors import ConfigError
from preftune.runfolder import DATA_AUDIT, DATA_REPORT
from tests.support import save_tiny_model

TEMPLATE = """\
preference_training:
  model: {base_model: "path/or/name", reference_model: null, freeze_reference: true}
  optimization: {method: "cpo", learning_rate: 5e-7, batch_size: 32, gradient_accumulation_steps: 4, num_epochs: 3, warmup_ratio: 0.1}
  constraints: {margin_threshold: 0.1, lagrangian_lr: 0.01, initial_lambda: 0.0, temperature: 1.0, length_normalize: true}
  monitoring: {eval_steps: 100, validation_size: 500, alert_negative_margin_ratio: 0.15, alert_constraint_violation: 0.05, alert_patience: 3}
  data: {synthetic_ratio: 0.7, human_ratio: 0.3, kl_divergence_threshold: 0.15, max_sequence_length: 2048}
"""
EMBEDDED_HH = Path(__file__).resolve().parents[1] / "preftune" / "datasets" / "hh-rlhf-harmless"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "template.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_template_as_written_loads_and_maps_every_key(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="preftune.config"):
        config = load_config(_write(tmp_path, TEMPLATE))
    assert config.model.name_or_path == "path/or/name"
    assert config.method.loss_type == "cpo"
    training = config.training
    assert (training.learning_rate, training.per_device_train_batch_size, training.gradient_accumulation_steps) == (5e-7, 32, 4)
    assert (training.num_train_epochs, training.warmup_ratio, training.eval_steps) == (3, 0.1, 100)
    constraints = config.method.constraints
    assert (constraints.margin_threshold, constraints.lagrangian_lr, constraints.initial_lambda) == (0.1, 0.01, 0.0)
    assert (constraints.temperature, constraints.length_normalize) == (1.0, True)
    assert (constraints.violation_alert, constraints.patience) == (0.05, 3)
    assert config.monitoring.alert_negative_margin_ratio == 0.15
    assert (config.data.max_validation_samples, config.data.max_length) == (500, 2048)
    assert (config.data.human_ratio, config.data.kl_divergence_threshold) == (0.3, 0.15)
    assert "not_yet_applied" not in type(config).model_fields
    log = caplog.text
    assert "preference_training.optimization.batch_size → training.per_device_train_batch_size" in log
    assert "preference_training.monitoring.validation_size → data.max_validation_samples" in log
    assert "preference_training.data.human_ratio → data.human_ratio = 0.3" in log
    assert "preference_training.data.kl_divergence_threshold → data.kl_divergence_threshold = 0.15" in log
    assert "preference_training.data.synthetic_ratio = 0.7: consistent with human_ratio = 1 − synthetic_ratio" in log
    assert "it acts on data.sources" in log  # the floor has no files tagged human/synthetic here


def test_synthetic_ratio_alone_sets_human_ratio_and_must_agree_with_it(tmp_path):
    alone = load_config(_write(tmp_path, TEMPLATE.replace("human_ratio: 0.3, ", "")))
    assert alone.data.human_ratio == 0.3  # 1 − 0.7, without the float's 0.30000000000000004
    with pytest.raises(ConfigError, match=r"synthetic_ratio: 0.6 and human_ratio 0.3 do not add up to 1"):
        load_config(_write(tmp_path, TEMPLATE.replace("synthetic_ratio: 0.7", "synthetic_ratio: 0.6")))
    with pytest.raises(ConfigError, match=r"synthetic_ratio: 1.5: expected the synthetic share"):
        load_config(_write(tmp_path, TEMPLATE.replace("synthetic_ratio: 0.7, human_ratio: 0.3", "synthetic_ratio: 1.5")))


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("margin_threshold: 0.1", "margin_treshold: 0.1", "preference_training.constraints.margin_treshold: unknown key"),
        ("max_sequence_length: 2048", "max_seq_len: 2048", "preference_training.data.max_seq_len: unknown key"),
        ("eval_steps: 100", "eval_every: 100", "preference_training.monitoring.eval_every: unknown key"),
        ("  data: {", "  dataset: {", "preference_training.dataset: unknown section"),
        ("reference_model: null", "reference_model: other/model", "preference_training.model.reference_model: 'other/model': preftune takes the reference from the base model"),
        ("freeze_reference: true", "freeze_reference: false", "always frozen"),
    ],
)
def test_unknown_or_unsupported_template_keys_are_errors_naming_the_key(tmp_path, old, new, named):
    assert old in TEMPLATE
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(_write(tmp_path, TEMPLATE.replace(old, new)))


def test_bad_template_values_are_errors_naming_the_translated_key(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.learning_rate"):
        load_config(_write(tmp_path, TEMPLATE.replace("learning_rate: 5e-7", "learning_rate: -1")))


def test_overrides_reach_the_template_or_the_translated_config(tmp_path):
    config = load_config(
        _write(tmp_path, TEMPLATE),
        ["preference_training.constraints.margin_threshold=0.3", "training.max_steps=7", "output_dir=elsewhere"],
    )
    assert config.method.constraints.margin_threshold == 0.3
    assert config.training.max_steps == 7
    assert config.output_dir == "elsewhere"


def test_a_template_for_another_method_drops_the_constraints_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="preftune.config"):
        config = load_config(_write(tmp_path, TEMPLATE.replace('method: "cpo"', 'method: "dpo"')))
    assert config.method.loss_type == "dpo" and not hasattr(config.method, "constraints")
    assert "preference_training.constraints.margin_threshold ignored" in caplog.text


def test_the_template_trains_with_only_the_model_and_data_paths_changed(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "tiny-model")
    for split, pairs in (("train", 12), ("validation", 4)):
        shortest = sorted((EMBEDDED_HH / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(), key=len)[:pairs]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(shortest) + "\n", encoding="utf-8")
    text = TEMPLATE.replace('"path/or/name"', f'"{model_dir}"').replace(
        "  data: {", f'  data: {{train_file: "{tmp_path / "train.jsonl"}", validation_file: "{tmp_path / "validation.jsonl"}", '
    )
    monkeypatch.chdir(tmp_path)  # the template names no output_dir: the run goes to ./runs/preftune

    assert main(["train", "--config", str(_write(tmp_path, text))]) == 0

    run = tmp_path / "runs" / "preftune"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 12 pairs at batch 32 × accumulation 4: one optimiser step per epoch, three epochs.
    assert max(record["step"] for record in steps) == 3
    state = json.loads((run / "final" / "lagrangian_state.json").read_text())
    assert [entry["step"] for entry in state["history"]] == [1, 2, 3]
    assert "loss_type: cpo" in (run / "config.yaml").read_text()


DESIGN_TEMPLATE = """\
preference_training:
  model:
    policy_path: "models/base_llm_v2"
    reference_path: "models/base_llm_v2" # Must match policy initialization
    freeze_reference: true
  optimization:
    policy_lr: 1.0e-5
    policy_weight_decay: 0.01
    lagrangian_lr: 0.01
    margin_threshold: 0.1
    gradient_clip_norm: 1.0
    batch_size: 4
    gradient_accumulation_steps: 8
  constraints:
    enforce_positive_margin: true
    normalize_by_length: true
    multiplier_clamp_min: 0.0
    violation_alert_threshold: 0.05
  monitoring:
    track_preference_accuracy: true
    track_margin_distribution: true
    divergence_alert: true
    evaluation_interval_steps: 500
  data:
    preference_source: "mixed_human_synthetic"
    human_ratio: 0.3
    max_sequence_length: 2048
    kl_divergence_threshold: 0.15
"""


def test_the_design_documents_template_verbatim_is_constrained_dpo_with_every_key_mapped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="preftune.config"):
        config = load_config(_write(tmp_path, DESIGN_TEMPLATE))
    assert config.method.loss_type == "cpo"  # enforce_positive_margin: true
    constraints = config.method.constraints
    assert (constraints.lagrangian_lr, constraints.margin_threshold, constraints.length_normalize) == (0.01, 0.1, True)
    assert constraints.violation_alert == 0.05
    training = config.training
    assert (training.learning_rate, training.weight_decay, training.max_grad_norm) == (1e-5, 0.01, 1.0)
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps, training.eval_steps) == (4, 8, 500)
    assert config.monitoring.alert_negative_margin_ratio == 0.15
    assert config.data.max_length == 2048
    assert "the template names no data files; give them as data.train_file" in caplog.text


def test_every_problem_of_a_template_is_reported_at_once(tmp_path):
    broken = (
        DESIGN_TEMPLATE.replace("policy_lr:", "policy_lrr:")
        .replace("multiplier_clamp_min: 0.0", "multiplier_clamp_min: 0.5")
        .replace('reference_path: "models/base_llm_v2"', 'reference_path: "models/other"')
    )
    with pytest.raises(ConfigError) as raised:
        load_config(_write(tmp_path, broken))
    message = str(raised.value)
    assert "3 problem(s)" in message
    assert "optimization.policy_lrr: unknown key" in message
    assert "multiplier_clamp_min: 0.5" in message and "reference_path" in message


def test_the_design_template_trains_as_written_with_only_paths_changed(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "tiny-model")
    for split, pairs in (("train", 12), ("validation", 4)):
        shortest = sorted((EMBEDDED_HH / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(), key=len)[:pairs]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(shortest) + "\n", encoding="utf-8")
    text = DESIGN_TEMPLATE.replace('"models/base_llm_v2"', f'"{model_dir}"').replace(
        "  data:\n", f'  data:\n    train_file: "{tmp_path / "train.jsonl"}"\n    validation_file: "{tmp_path / "validation.jsonl"}"\n'
    )
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(_write(tmp_path, text))]) == 0
    run = tmp_path / "runs" / "preftune"
    assert "loss_type: cpo" in (run / "config.yaml").read_text()
    assert "human_ratio: 0.3" in (run / "config.yaml").read_text()
    assert json.loads((run / "final" / "lagrangian_state.json").read_text())["history"]
    # hh-rlhf records carry no provenance: the floor is a no-op the run's data summary says
    summary = (run / DATA_REPORT).read_text(encoding="utf-8")
    assert "data warning: data.human_ratio 0.3 NOT applied" in summary
    evidence = json.loads((run / DATA_AUDIT).read_text(encoding="utf-8"))  # the report's Data audit section reads it
    kept = int(re.search(r"train\.jsonl \(hh_rlhf\): read 12, kept (\d+)", summary).group(1))
    assert evidence["audit"]["kind"] == "paired" and evidence["audit"]["count"] == kept  # the training split as trained
    assert [w.split(":")[0] for w in evidence["warnings"]] == ["data.human_ratio 0.3 NOT applied"]
