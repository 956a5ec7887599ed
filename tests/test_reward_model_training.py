"""Reward-model training through the one loop (`preftune train-reward`), its export, and `preftune score`."""

from __future__ import annotations

import json

import pytest

from preftune import runfolder
from preftune.cli import main
from preftune.config import validate_config
from preftune.methods.reward_model import REWARD_MODEL_FOLDER
from preftune.run import build_trainer
from tests.support import save_tiny_model, tiny_run_config

WORDS = ["apple", "river", "stone", "cloud", "music", "garden", "window", "candle", "forest", "bridge", "paper", "light"]


def _toy_pairs(path, count, offset=0):
    """A separable preference: the chosen answer ends with ' good', the rejected one with ' bad'."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(offset, offset + count):
            topic = f"{WORDS[i % len(WORDS)]} {WORDS[(i * 5 + 3) % len(WORDS)]}"
            out.write(json.dumps({"prompt": f"Tell me about {topic}.", "chosen": f" It is {topic} good",
                                  "rejected": f" It is {topic} bad"}) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _config(tmp_path, model_dir, **training):
    config = tiny_run_config(
        tmp_path / "run", model_dir,
        data={"train_file": str(_toy_pairs(tmp_path / "train.jsonl", 48)),
              "validation_file": str(_toy_pairs(tmp_path / "validation.jsonl", 20, offset=100)),
              "max_train_samples": None, "max_validation_samples": None},
        training={"max_steps": 40, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "eval_steps": 20, **training},
    )
    raw = config.model_dump(mode="json")
    raw["method"] = {"loss_type": "reward_model"}
    return validate_config(raw)


def test_a_reward_model_learns_a_separable_preference_and_exports_a_scoring_folder(tmp_path, model_dir):
    result = build_trainer(_config(tmp_path, model_dir)).train()
    assert result.first_eval["eval/rewards/accuracies"] < 0.95
    assert result.final_eval["eval/rewards/accuracies"] >= 0.95
    evaluation = runfolder.read_jsonl(runfolder.evaluation_path(tmp_path / "run", 40))
    assert len(evaluation) == 20 and all(row["reference_logps"] is None for row in evaluation)
    exported = tmp_path / "run" / "final" / REWARD_MODEL_FOLDER
    assert (exported / "config.json").is_file() and not (tmp_path / "run" / "final" / "adapter").exists()

    data = tmp_path / "to_score.jsonl"
    data.write_text(
        json.dumps({"prompt": "Tell me about stone cloud.", "completion": " It is stone cloud good"}) + "\n"
        + json.dumps({"prompt": "Tell me about stone cloud.", "completion": " It is stone cloud bad"}) + "\n"
        + json.dumps({"prompt": "Tell me about paper light.", "chosen": " It is paper light good", "rejected": " It is paper light bad"}) + "\n",
        encoding="utf-8",
    )
    assert main(["score", "--model", str(exported), "--data", str(data)]) == 0
    scored = runfolder.read_jsonl(tmp_path / "to_score.scored.jsonl")
    assert scored[0]["score"] > scored[1]["score"]
    assert scored[2]["score_chosen"] > scored[2]["score_rejected"]
    assert scored[0]["completion"] == " It is stone cloud good"


def test_train_reward_is_train_with_the_reward_model_method(tmp_path, model_dir):
    config = _config(tmp_path, model_dir, max_steps=2, eval_steps=2)
    path = tmp_path / "config.yaml"
    raw = config.model_dump(mode="json")
    raw["method"] = {}
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert main(["train-reward", "--config", str(path)]) == 0
    identity = json.loads((tmp_path / "run" / runfolder.IDENTITY).read_text(encoding="utf-8"))
    assert identity["method"] == "reward_model" and identity["status"] == "finished"
    # The report judges the reward model's accuracy and margins, never its scores as if they were log-probs.
    summary = (tmp_path / "run" / "summary.md").read_text(encoding="utf-8")
    assert "| preference accuracy |" in summary
    assert "log p(chosen) per token" not in summary and "log p(rejected) per token" not in summary
