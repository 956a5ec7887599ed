"""Every loss trains the tiny model from a YAML config: finite loss, moving weights, rising accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from preftune.config import load_config
from preftune.errors import ConfigError
from preftune.methods import METHODS
from preftune.run import build_trainer
from preftune.train import setup as training_setup
from tests.support import save_tiny_model

PAIRWISE = {
    "sigmoid": {},
    "ipo": {"beta": 0.5},
    "hinge": {},
    "robust": {"label_smoothing": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.5},
    "orpo": {},
    "sft": {},
}
REFERENCE_FREE = sorted(name for name, method in METHODS.items() if not method.needs_reference)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _yaml_config(tmp_path, model_dir, loss_type: str, method: dict, data: dict | None = None, **training):
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir), "lora": {"r": 4, "alpha": 8}},
        "data": {"max_train_samples": 8, "max_validation_samples": 4, "max_length": 96, "max_prompt_length": 64, **(data or {})},
        "method": {"loss_type": loss_type, **method},
        "training": {
            "learning_rate": 2e-2,
            "per_device_train_batch_size": 4,
            "max_steps": 6,
            "warmup_ratio": 0.0,
            "eval_steps": 6,
            "report_to": ["jsonl"],
            **training,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_config(path)


def _trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}


def _train_on_its_own_training_set(trainer):
    trainer.data.validation = trainer.data.train  # overfit: measure on the training examples themselves
    before = _trainable(trainer)
    result = trainer.train()
    after = _trainable(trainer)
    losses = [step["loss"] for step in _metrics(trainer) if "loss" in step]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert [n for n in before if torch.equal(before[n], after[n])] == []
    return result


def _metrics(trainer):
    return [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", sorted(PAIRWISE))
def test_pairwise_loss_trains_and_raises_preference_accuracy_on_the_overfit_set(tmp_path, model_dir, loss_type):
    trainer = build_trainer(_yaml_config(tmp_path, model_dir, loss_type, PAIRWISE[loss_type]))
    result = _train_on_its_own_training_set(trainer)
    assert result.final_eval["eval/rewards/accuracies"] > result.first_eval["eval/rewards/accuracies"]
    assert result.final_eval["eval/loss"] < result.first_eval["eval/loss"]


def test_kto_trains_from_paired_data_and_moves_rewards_the_labelled_way(tmp_path, model_dir):
    trainer = build_trainer(_yaml_config(tmp_path, model_dir, "kto", {"undesirable_weight": 1.0}))
    assert trainer.reference is not None
    assert sorted({example.label for example in trainer.data.train}) == [False, True]
    result = _train_on_its_own_training_set(trainer)
    assert result.first_eval["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at the start
    assert result.final_eval["eval/rewards/margins"] > 0
    assert result.final_eval["eval/rewards/accuracies"] > 0.5
    assert result.final_eval["eval/loss"] < result.first_eval["eval/loss"]
    assert "eval/kl" in result.final_eval


def test_kto_trains_on_batches_that_hold_only_one_label(tmp_path, model_dir):
    kto_file = tmp_path / "desirable.jsonl"
    kto_file.write_text(
        "".join(
            f'{{"prompt": "Human: say {word}\\n\\nAssistant:", "completion": " {word} {word}.", "label": true}}\n'
            for word in ("yes", "no", "maybe", "never", "always", "soon")
        ),
        encoding="utf-8",
    )
    data = {"train_file": str(kto_file), "validation_file": None, "validation_split": 2, "max_train_samples": None}
    trainer = build_trainer(
        _yaml_config(tmp_path, model_dir, "kto", {}, data, max_steps=3, per_device_train_batch_size=3, eval_steps=3)
    )
    assert {example.label for example in trainer.data.train} == {True}
    _train_on_its_own_training_set(trainer)


def test_kto_refuses_a_batch_of_one(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="per_device_train_batch_size >= 2"):
        build_trainer(_yaml_config(tmp_path, model_dir, "kto", {}, per_device_train_batch_size=1))


@pytest.mark.parametrize("loss_type", REFERENCE_FREE)
def test_reference_free_losses_never_create_or_run_a_reference(tmp_path, model_dir, monkeypatch, loss_type):
    def no_reference(*args, **kwargs):
        raise AssertionError(f"{loss_type} created a reference model")

    monkeypatch.setattr(training_setup, "ReferenceModel", no_reference)
    trainer = build_trainer(_yaml_config(tmp_path, model_dir, loss_type, PAIRWISE.get(loss_type, {}), max_steps=2))
    assert trainer.reference is None

    def no_adapter_switch():
        raise AssertionError(f"{loss_type} disabled the adapter to run the reference")

    trainer.policy.disable_adapter = no_adapter_switch
    trainer.train()
