"""Clear errors instead of tracebacks, the safetensors-only default, and warnings for extreme settings.

Every CLI case goes through `preftune.cli.main` and checks the user's view: exit 2, one `error:`
line, no traceback.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.config import validate_config
from preftune.config_checks import config_warnings
from preftune.control import LossScaleAlert, StepContext
from preftune.errors import ModelError
from preftune.model.loading import load_model
from tests.support import load_test_tokenizer, save_tiny_model, tiny_llama, tiny_run_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def config_path(tmp_path, model_dir):
    config = tiny_run_config(tmp_path / "run", model_dir)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return " ".join(err.split())  # Rich wraps long lines


def test_a_malformed_set_value_is_one_error_line_naming_the_set(config_path, capsys):
    assert main(["config", "--config", str(config_path), "--set", "training.learning_rate=["]) == 2
    err = _one_error_line(capsys)
    assert "--set training.learning_rate=[" in err and "not a valid YAML value" in err


def test_a_python_tag_through_set_is_refused_not_constructed(config_path, capsys):
    override = "training.learning_rate=!!python/object/apply:os.system [echo pwned]"
    assert main(["config", "--config", str(config_path), "--set", override]) == 2
    err = _one_error_line(capsys)
    assert "--set training.learning_rate" in err and "!!python" in err and "pwned" not in err.split("error:")[0]


def test_an_output_dir_under_a_file_is_refused_before_the_model_loads(tmp_path, config_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # The model path does not exist: if the model were loaded first, the error would be about the model.
    args = ["train", "--config", str(config_path), "--set", f"output_dir={blocker / 'sub'}", "--set", "model.name_or_path=/nonexistent/model"]
    assert main(args) == 2
    err = _one_error_line(capsys)
    assert f"output_dir {blocker / 'sub'}" in err and "is a file" in err
    assert blocker.read_text() == "not a folder"


def test_a_folder_of_the_users_files_is_refused_before_the_model_loads(tmp_path, config_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["train", "--config", str(config_path), "--set", f"output_dir={mine}", "--set", "model.name_or_path=/nonexistent/model"]
    assert main(args) == 2
    err = _one_error_line(capsys)
    assert "is not a preftune run (it holds notes.txt)" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so chmod cannot make one unwritable")
def test_a_read_only_parent_is_refused_before_the_model_loads(tmp_path, config_path, capsys):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        args = ["train", "--config", str(config_path), "--set", f"output_dir={parent / 'run'}", "--set", "model.name_or_path=/nonexistent/model"]
        assert main(args) == 2
        err = _one_error_line(capsys)
        assert "permission denied" in err and str(parent) in err
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


@pytest.fixture(scope="module")
def pickle_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickle") / "tiny"
    folder.mkdir()
    tokenizer = load_test_tokenizer()
    model = tiny_llama(len(tokenizer))
    # transformers 5 writes safetensors even with safe_serialization=False; write the pickle a checkpoint from an older tool has.
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


def test_pickle_only_weights_are_refused_with_how_to_convert_or_opt_in(tmp_path, config_path, pickle_model_dir, capsys):
    args = ["train", "--config", str(config_path), "--set", f"model.name_or_path={pickle_model_dir}"]
    assert main(args) == 2
    err = _one_error_line(capsys)
    assert "pytorch_model.bin" in err and "safe_serialization=True" in err and "model.allow_pickle: true" in err
    assert not (tmp_path / "run").exists()


def test_allow_pickle_loads_the_same_weights_and_warns(pickle_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="preftune.model.loading"):
        model = load_model(str(pickle_model_dir), allow_pickle=True)
    assert any("allow_pickle" in record.getMessage() and "pytorch_model.bin" in record.getMessage() for record in caplog.records)
    expected = tiny_llama(model.config.vocab_size)  # same seed as the saved weights
    assert all(
        (a == b).all() for a, b in zip(model.state_dict().values(), expected.state_dict().values())
    )
    with pytest.raises(ModelError, match="pickle"):
        load_model(str(pickle_model_dir))


def test_a_model_needing_custom_code_says_to_set_trust_remote_code(tmp_path, config_path, model_dir, capsys):
    custom = tmp_path / "custom_model"
    custom.mkdir()
    for item in model_dir.iterdir():
        (custom / item.name).write_bytes(item.read_bytes())
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "preftune_custom_test"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code_ran"
    for module in ("configuration_custom.py", "modeling_custom.py"):
        (custom / module).write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert main(["train", "--config", str(config_path), "--set", f"model.name_or_path={custom}"]) == 2
    err = _one_error_line(capsys)
    assert "model.trust_remote_code: true" in err and "only if you trust" in err
    assert not marker.exists()


def _config(tmp_path, **sections):
    return tiny_run_config(tmp_path / "run", tmp_path / "model", **sections)


def test_config_warnings_flag_extreme_settings_and_only_those(tmp_path):
    assert config_warnings(_config(tmp_path)) == []  # the tiny config: LoRA at 5e-3, beta 0.1
    lora_extreme = config_warnings(_config(tmp_path, training={"learning_rate": 0.5}))
    assert len(lora_extreme) == 1 and "learning_rate 0.5 is extreme for LoRA" in lora_extreme[0]
    full = {"name_or_path": str(tmp_path / "model"), "lora": None}
    full_extreme = config_warnings(_config(tmp_path, model=full, training={"learning_rate": 2e-2}))
    assert len(full_extreme) == 1 and "learning_rate 0.02 is extreme for a full fine-tune" in full_extreme[0]
    assert config_warnings(_config(tmp_path, model=full, training={"learning_rate": 5e-6})) == []
    unclipped = config_warnings(_config(tmp_path, training={"learning_rate": 2e-3, "max_grad_norm": None}))
    assert len(unclipped) == 1 and "max_grad_norm is null" in unclipped[0]
    assert "beta 1e+06 is extreme" in config_warnings(_config(tmp_path, method={"loss_type": "sigmoid", "beta": 1e6}))[0]
    assert "tiny" in config_warnings(_config(tmp_path, method={"loss_type": "sigmoid", "beta": 1e-5}))[0]
    sft = validate_config({**_config(tmp_path).model_dump(mode="json"), "method": {"loss_type": "sft"}})
    assert config_warnings(sft) == []  # no beta: nothing to judge


def test_the_loss_scale_alert_fires_once_above_its_threshold():
    alerts = []
    guard = LossScaleAlert(threshold=100.0)
    for step, loss in enumerate([0.7, 99.0, 16000.0, 20000.0, float("nan")], start=1):
        guard.on_step_end(StepContext(step=step, total_steps=5, epoch=0, metrics={"loss": loss}, alert=lambda *a, **k: alerts.append((a, k))))
    assert len(alerts) == 1 and alerts[0][0][0] == "loss_scale" and alerts[0][1]["loss"] == 16000.0
    restored = LossScaleAlert(threshold=100.0)
    restored.load_state_dict(guard.state_dict())
    restored.on_step_end(StepContext(step=6, total_steps=6, epoch=0, metrics={"loss": 1e6}, alert=lambda *a, **k: alerts.append(a)))
    assert len(alerts) == 1


def test_lr_1e3_and_beta_1e6_warn_up_front_and_alert_on_the_loss(tmp_path, model_dir, capsys):
    config = tiny_run_config(
        tmp_path / "ignored", model_dir, method={"loss_type": "sigmoid", "beta": 1e6},
        training={"learning_rate": 1e3, "max_steps": 3, "eval_steps": None, "save_steps": None},
    )
    path = tmp_path / "extreme.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output-dir", str(run_dir)]) == 0
    err = " ".join(capsys.readouterr().err.split())  # Rich wraps long lines
    assert "warning: training.learning_rate 1000 is extreme for LoRA" in err
    assert "warning: method.beta 1e+06 is extreme" in err
    # Up front: before the first evaluation / training step is printed, and each once.
    assert err.index("warning:") < err.index("eval @ step 0")
    assert err.count("beta 1e+06 is extreme") == 1
    recorded = json.loads((run_dir / "run.json").read_text())["warnings"]
    assert recorded == config_warnings(validate_config({**config.model_dump(mode="json"), "output_dir": str(run_dir)}))
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    scale = [a for a in alerts if a["kind"] == "loss_scale"]
    assert len(scale) == 1 and scale[0]["loss"] > 100
