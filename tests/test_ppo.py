"""PPO through the one training loop: a value head on the policy, the KL coefficient as a checkpointed controller,
GAE advantages from the rollout, and a rule reward that rises."""

from __future__ import annotations

import json

import pytest
import torch

from preftune import runfolder
from preftune.config import validate_config
from preftune.methods.base import GroupLogps
from preftune.methods.ppo import VALUE_HEAD, PPOLoss, PPOSample, PPOSettings, step_explained_variance
from preftune.methods.reward_model import REWARD_MODEL_FOLDER
from preftune.online.generation import GenerationSettings, generate
from preftune.run import build_trainer
from tests.support import save_tiny_model, tiny_run_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _config(run_dir, model_dir, method, *, prompts=64, **training):
    config = tiny_run_config(
        run_dir, model_dir, model={"name_or_path": str(model_dir), "lora": None},
        data={"max_train_samples": prompts, "max_validation_samples": 4, "max_prompt_length": 32, "max_length": 64},
        training={"per_device_train_batch_size": 16, "learning_rate": 2e-2, "logging_steps": 1, **training},
    )
    raw = config.model_dump(mode="json")
    raw["method"] = {"loss_type": "ppo", "generation": {"max_new_tokens": 8},
                     "rewards": [{"function": "contains", "text": "k"}], **method}
    return validate_config(raw)


def test_the_clipped_losses_match_a_hand_calculation():
    settings = PPOSettings(loss_type="ppo", clip_range=0.2, value_clip_range=0.2, value_coef=0.5)
    sample = PPOSample([1], ([5, 6],), scores=(1.0,), old_logps=(-1.0, -1.0), old_values=(0.0, 0.0),
                       advantages=(1.0, -1.0), returns=(1.0, 0.0))
    logps = torch.tensor([[[-0.5, -1.0]]])  # ρ = e^0.5 ≈ 1.649 (clipped to 1.2 for A = +1), 1
    values = torch.tensor([[[0.5, 0.0]]])  # clipped to 0.2: max((0.5−1)², (0.2−1)²) = 0.64
    output = PPOLoss(settings)(GroupLogps(logps, torch.ones(1, 1, 2), None, [sample], values), None)
    policy = (-1.2 + 1.0) / 2  # token 1: max(−1.649, −1.2) = −1.2; token 2: max(1, 1) = 1
    value = 0.5 * (0.64 + 0.0) / 2
    torch.testing.assert_close(output.losses, torch.tensor([policy + 0.5 * value]))
    assert output.metrics["policy/clip_fraction"].item() == 0.5


def test_explained_variance_matches_a_hand_calculation_and_reaches_the_metrics():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])  # Var = 1.25
    values = torch.tensor([1.5, 2.0, 2.5, 4.0])  # R − V = (−0.5, 0, 0.5, 0): mean 0, Var = 0.125
    assert step_explained_variance(values, returns) == pytest.approx(1 - 0.125 / 1.25)  # 0.9
    assert step_explained_variance(returns, returns) == 1.0
    assert step_explained_variance(torch.full((4,), 2.5), returns) == pytest.approx(0.0)  # the mean explains nothing
    assert step_explained_variance(values, torch.ones(4)) == 0.0  # constant returns: nothing to explain
    settings = PPOSettings(loss_type="ppo")
    sample = PPOSample([1], ([5, 6],), scores=(1.0,), old_logps=(-1.0, -1.0), old_values=(0.0, 0.0),
                       advantages=(1.0, -1.0), returns=(1.0, 0.0), entropy=2.5, explained_variance=0.9)
    output = PPOLoss(settings)(GroupLogps(torch.full((1, 1, 2), -1.0), torch.ones(1, 1, 2), None, [sample], torch.zeros(1, 1, 2)), None)
    assert output.metrics["policy/entropy"].item() == 2.5
    assert output.metrics["value/explained_variance"].item() == pytest.approx(0.9)


def test_ppo_raises_the_reward_with_a_value_head_and_a_checkpointed_kl_controller(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    trainer = build_trainer(_config(run_dir, model_dir, {"kl_coef": 0.01, "adaptive_kl": True, "target_kl": 0.5, "kl_horizon": 100,
                                                         "ppo_epochs": 2}, max_steps=30, eval_steps=30))
    assert any(name.startswith(VALUE_HEAD) for name, p in trainer.policy.named_parameters() if p.requires_grad)
    trainer.train()
    rows = [row for row in runfolder.read_jsonl(run_dir / runfolder.METRICS) if "loss" in row]
    rewards = [row["reward"] for row in rows]
    assert sum(rewards[:4]) / 4 < 0.5 and sum(rewards[-6:]) / 6 > sum(rewards[:4]) / 4 + 0.3, rewards
    assert rows[0]["reward"] == rows[1]["reward"]  # ppo_epochs 2: one rollout, two updates
    assert rows[0]["kl_coef"] != rows[-1]["kl_coef"]  # the adaptive coefficient moved
    assert all(row["policy/entropy"] > 0 and row["value/explained_variance"] <= 1 for row in rows)
    assert rows[-1]["value/explained_variance"] != rows[0]["value/explained_variance"]  # the value head learns
    state = json.loads((run_dir / runfolder.CONTROLLERS).read_text(encoding="utf-8"))["kl_coefficient"]
    assert state["kind"] == "adaptive" and state["value"] == rows[-1]["kl_coef"]
    assert runfolder.evaluation_steps(run_dir) == [0, 30]
    assert all("reward" in row for row in runfolder.read_jsonl(runfolder.evaluation_path(run_dir, 30)))


def test_after_a_crash_and_resume_ppo_equals_a_straight_run(tmp_path, model_dir):
    from tests.test_run_folder import CrashAt

    method = {"kl_coef": 0.05, "adaptive_kl": True, "target_kl": 0.5, "kl_horizon": 100, "ppo_epochs": 2}
    training = {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "per_device_train_batch_size": 4}
    build_trainer(_config(tmp_path / "straight", model_dir, method, **training)).train()
    crashed = build_trainer(_config(tmp_path / "resumed", model_dir, method, **training))
    crashed.controllers.append(CrashAt(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    resumed = _config(tmp_path / "resumed", model_dir, method, **training).model_copy(update={"resume_from": "latest"})
    build_trainer(resumed).train()

    def rows(run_dir):
        return [{k: v for k, v in row.items() if k not in ("time", "pairs_per_second")}
                for row in runfolder.read_jsonl(run_dir / runfolder.METRICS)]

    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    assert ((tmp_path / "resumed" / runfolder.CONTROLLERS).read_bytes()
            == (tmp_path / "straight" / runfolder.CONTROLLERS).read_bytes())


SAMPLES_PER_PROMPT = 8


def _own_samples(trainer, prompts: range, *, seed: int) -> tuple[list[str], list[list[int]], list[str]]:
    """SAMPLES_PER_PROMPT completions of each prompt by the tiny policy itself: (prompt texts, completion ids, texts)."""
    examples = [trainer.data.train[i] for i in prompts]
    settings = GenerationSettings(max_new_tokens=8, num_return_sequences=SAMPLES_PER_PROMPT)
    generations = generate(trainer.policy, trainer.tokenizer, [e.prompt_ids for e in examples], settings, seed=seed)
    return (trainer.tokenizer.batch_decode([e.prompt_ids for e in examples], skip_special_tokens=True),
            generations.completion_ids, generations.texts)


def _write_labelled_pairs(path, samples) -> int:
    """The hidden labeller: it prefers completions with more even token ids. Per prompt, its best three completions
    are paired with its worst three wherever the labeller's counts differ by at least 2."""
    prompts, ids, texts = samples
    even = [sum(token % 2 == 0 for token in completion) for completion in ids]
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for k, prompt in enumerate(prompts):
            ranked = sorted(range(k * SAMPLES_PER_PROMPT, (k + 1) * SAMPLES_PER_PROMPT), key=even.__getitem__)
            for worse, better in zip(ranked[:3], reversed(ranked[-3:])):
                if even[better] - even[worse] >= 2:
                    out.write(json.dumps({"prompt": prompt, "chosen": texts[better], "rejected": texts[worse]}) + "\n")
                    count += 1
    return count


def test_ppo_raises_the_score_of_a_reward_model_trained_on_the_policys_own_labelled_samples(tmp_path, model_dir):
    # RLHF end to end: sample from the policy, label the samples (here by a hidden rule), fit a Bradley–Terry reward
    # model on the pairs through `preftune train-reward`'s method, then PPO against that model's score alone.
    sampler = build_trainer(_config(tmp_path / "sampler", model_dir, {}, prompts=464, max_steps=1))
    train_samples, validation_samples = _own_samples(sampler, range(0, 400), seed=1), _own_samples(sampler, range(400, 464), seed=2)
    train_pairs = _write_labelled_pairs(tmp_path / "rm-train.jsonl", train_samples)
    validation_pairs = _write_labelled_pairs(tmp_path / "rm-validation.jsonl", validation_samples)
    assert train_pairs >= 600 and validation_pairs >= 100, (train_pairs, validation_pairs)

    reward_config = tiny_run_config(
        tmp_path / "reward-model", model_dir, model={"name_or_path": str(model_dir), "lora": None},
        data={"train_file": str(tmp_path / "rm-train.jsonl"), "validation_file": str(tmp_path / "rm-validation.jsonl"),
              "max_train_samples": None, "max_validation_samples": None, "max_prompt_length": 32, "max_length": 64},
        training={"max_steps": 200, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "eval_steps": 200},
    ).model_dump(mode="json")
    reward_config["method"] = {"loss_type": "reward_model"}
    fitted = build_trainer(validate_config(reward_config)).train()
    assert fitted.final_eval["eval/rewards/accuracies"] >= 0.8, fitted.final_eval
    reward_model = tmp_path / "reward-model" / "final" / REWARD_MODEL_FOLDER

    run_dir = tmp_path / "ppo"
    config = _config(run_dir, model_dir, {"kl_coef": 0.01, "ppo_epochs": 2,
                                          "rewards": [{"function": "reward_model", "path": str(reward_model)}]},
                     max_steps=40, eval_steps=40)
    build_trainer(config).train()
    rows = runfolder.read_jsonl(run_dir / runfolder.METRICS)
    rollouts = [row["reward"] for row in rows if "loss" in row][::2]  # ppo_epochs 2: each rollout's score is logged twice
    evaluations = [row["eval/reward"] for row in rows if "eval/reward" in row]
    # Against the reward model's own scale: its mean chosen − rejected score gap on the held-out labelled pairs.
    gap = fitted.final_eval["eval/rewards/chosen"] - fitted.final_eval["eval/rewards/rejected"]
    assert sum(rollouts[-5:]) / 5 > sum(rollouts[:5]) / 5 + 0.1 * gap, (rollouts, gap)
    assert evaluations[-1] > evaluations[0] + 0.3 * gap, (evaluations, gap)  # the same validation prompts and seed
