"""GRPO through the one training loop: prompt-only data, the rollout hook, KL 0 at step 0, no reference at β 0,
the reward rising, exact resume, and the run folder + report as for offline methods."""

from __future__ import annotations

import math

import pytest
import torch

from preftune import runfolder
from preftune.data.collate import pack_examples
from preftune.data.pipeline import prepare_examples
from preftune.errors import DataError
from preftune.eval.html_report import build_report
from preftune.logprobs import sequence_logps
from preftune.methods import get_method
from preftune.methods.base import GroupLogps, per_token_matrix
from preftune.methods.grpo import GRPOLoss, GRPOSettings, RolloutGroup
from preftune.run import build_trainer
from tests.support import load_test_tokenizer, save_tiny_model, tiny_llama, tiny_run_config

NONDETERMINISTIC = {"time", "pairs_per_second"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _config(run_dir, model_dir, *, method=None, training=None, data=None, **top):
    return tiny_run_config(
        run_dir, model_dir,
        data={"max_train_samples": 16, "max_validation_samples": 4, "max_prompt_length": 32, "max_length": 64, **(data or {})},
        method={"loss_type": "grpo", "num_generations": 4, "beta": 0.04, "generation": {"max_new_tokens": 6},
                "rewards": [{"function": "contains", "text": "e"}], **(method or {})},
        training={"max_steps": 4, "per_device_train_batch_size": 2, "eval_steps": 2, "logging_steps": 1, **(training or {})},
        **top,
    )


def _train_rows(run_dir):
    rows = runfolder.read_jsonl(run_dir / runfolder.METRICS)
    return [{k: v for k, v in row.items() if k not in NONDETERMINISTIC} for row in rows]


def test_prompt_only_data_comes_from_prompt_files_and_from_paired_files(tmp_path):
    tokenizer = load_test_tokenizer()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"prompt": "How are you?"}\n{"prompt": 3}\n', encoding="utf-8")
    settings = _config(tmp_path / "run", tmp_path).data.model_copy(update={"train_file": str(prompts), "validation_file": str(prompts)})
    data = prepare_examples(settings, tokenizer, seed=0, paired=False, prompts=True)
    assert [example.answer_ids for example in data.train] == [(), ()]
    assert tokenizer.decode(data.train[0].prompt_ids, skip_special_tokens=True) == "Hello there"
    assert data.load_reports[0].skipped == {"wrong_type": 1}
    with pytest.raises(DataError, match=r"prompts.jsonl:3"):
        prepare_examples(settings.model_copy(update={"skip_invalid": False}), tokenizer, seed=0, paired=False, prompts=True)
    hh = prepare_examples(_config(tmp_path / "run", tmp_path).data, tokenizer, seed=0, paired=False, prompts=True)
    assert len(hh.train) == 16 and all(example.answer_ids == () for example in hh.train)
    assert data.unit == "prompts"


def test_per_token_matrix_puts_every_engine_token_in_its_answer_slot():
    tokenizer = load_test_tokenizer()
    model = tiny_llama(len(tokenizer)).eval()
    prompts = [[1, 5, 6], [7, 8]]
    answers = [([9, 10, 11], [12]), ([13], [14, 15, 16, 17])]
    batch = pack_examples(prompts, answers, pad_id=0)
    with torch.no_grad():
        logps = sequence_logps(model, batch, per_token=True)
        tokens, mask = per_token_matrix(logps, batch.target_sequence, 2, 2)
        for e, (prompt, group) in enumerate(zip(prompts, answers)):
            for g, answer in enumerate(group):
                full = torch.tensor([prompt + list(answer)])
                expected = torch.log_softmax(model(full).logits[0, len(prompt) - 1 : -1].float(), -1)
                expected = expected.gather(1, torch.tensor(answer)[:, None])[:, 0]
                assert mask[e, g].sum().item() == len(answer)
                torch.testing.assert_close(tokens[e, g, : len(answer)], expected, atol=1e-5, rtol=1e-5)


def test_token_aggregation_over_micro_batches_equals_the_step_token_mean():
    """Σ_e loss_e / n (the loop's scaling) = Σ ℓ / N for aggregation token, whatever the micro-batch split."""
    settings = GRPOSettings(loss_type="grpo", num_generations=2, beta=0.0, aggregation="token")
    lengths = [(1, 3), (2, 2), (4, 1)]
    tokens_in_step = sum(sum(pair) for pair in lengths)
    groups = [
        RolloutGroup([1], tuple([5] * n for n in pair), scores=(float(e), 0.0), token_weight=len(lengths) / tokens_in_step)
        for e, pair in enumerate(lengths)
    ]
    logps = torch.zeros(3, 2, 4, requires_grad=True)
    mask = torch.zeros(3, 2, 4)
    for e, pair in enumerate(lengths):
        for g, n in enumerate(pair):
            mask[e, g, :n] = 1
    output = GRPOLoss(settings)(GroupLogps(logps, mask, None, groups), None)
    output.losses.sum().div(len(lengths)).backward()
    # ρ = 1, so ℓ_t = −A_i and its gradient is −A_i / N on every real token of completion i.
    # rewards (e, 0): group 0 is tied (A = 0); groups 1, 2: A = ±(r − mean)/std = ±(e/2)/(e/√2) = ±1/√2.
    advantages = torch.tensor([[0.0, 0.0], [0.7071, -0.7071], [0.7071, -0.7071]])
    expected = -(advantages[:, :, None] * mask) / tokens_in_step
    torch.testing.assert_close(logps.grad, expected, atol=1e-3, rtol=1e-3)


def test_beta_zero_builds_no_reference(tmp_path, model_dir):
    assert get_method("grpo").uses_reference(_config(tmp_path / "a", model_dir).method)
    trainer = build_trainer(_config(tmp_path / "b", model_dir, method={"beta": 0.0}))
    assert trainer.reference is None and trainer.reference_cache is None


def test_kl_is_exactly_zero_at_step_zero_and_the_run_folder_is_complete(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    build_trainer(_config(run_dir, model_dir, training={"max_steps": 2})).train()
    rows = [row for row in runfolder.read_jsonl(run_dir / runfolder.METRICS) if "loss" in row]
    assert rows[0]["step"] == 1 and rows[0]["kl"] == 0.0  # step 1's loss is computed with the step-0 weights
    assert rows[1]["kl"] > 0.0
    for key in ("reward", "reward_std", "reward/contains", "completion_length", "clip_ratio", "entropy"):
        assert key in rows[0]
    assert 0 < rows[0]["entropy"] <= math.log(len(load_test_tokenizer())) + 1e-6  # nats, at most log V
    assert runfolder.evaluation_steps(run_dir) == [0, 2]
    evaluation = runfolder.read_jsonl(runfolder.evaluation_path(run_dir, 0))
    assert len(evaluation) == 4 and len(evaluation[0]["answer_tokens"]) == 4 and "reward" in evaluation[0]
    assert (run_dir / "final" / "adapter").is_dir()
    report = build_report(run_dir)
    assert report.summary.is_file() and report.html.is_file()


def test_after_a_crash_and_resume_grpo_generates_and_logs_what_a_straight_run_does(tmp_path, model_dir):
    from tests.test_run_folder import CrashAt

    training = {"max_steps": 4, "save_steps": 2, "eval_steps": 2}
    build_trainer(_config(tmp_path / "straight", model_dir, training=training)).train()
    crashed = build_trainer(_config(tmp_path / "resumed", model_dir, training=training))
    crashed.controllers.append(CrashAt(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    build_trainer(_config(tmp_path / "resumed", model_dir, training=training, resume_from="latest")).train()
    straight, resumed = _train_rows(tmp_path / "straight"), _train_rows(tmp_path / "resumed")
    assert resumed == straight
    assert [row["step"] for row in resumed if "loss" in row] == [1, 2, 3, 4]
    for step in runfolder.evaluation_steps(tmp_path / "straight"):
        assert (runfolder.evaluation_path(tmp_path / "resumed", step).read_bytes()
                == runfolder.evaluation_path(tmp_path / "straight", step).read_bytes())


def test_num_iterations_reuses_one_rollout_with_the_clipped_ratio(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    build_trainer(_config(run_dir, model_dir, method={"num_iterations": 2, "beta": 0.0}, training={"max_steps": 2})).train()
    rows = [row for row in runfolder.read_jsonl(run_dir / runfolder.METRICS) if "loss" in row]
    assert rows[0]["reward"] == rows[1]["reward"]  # the same completions, scored once
    assert rows[0]["completion_length"] == rows[1]["completion_length"]


def test_grpo_raises_the_mean_reward(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    config = _config(
        run_dir, model_dir,
        model={"name_or_path": str(model_dir), "lora": None},
        data={"max_train_samples": 64},
        method={"beta": 0.0, "num_generations": 8, "rewards": [{"function": "contains", "text": "k"}]},
        training={"max_steps": 24, "per_device_train_batch_size": 4, "learning_rate": 2e-2, "eval_steps": 24},
    )
    build_trainer(config).train()
    rewards = [row["reward"] for row in runfolder.read_jsonl(run_dir / runfolder.METRICS) if "loss" in row]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.5 and last > first + 0.3, rewards


def answer_length(prompts, completions, answer):
    """A reward that reads the dataset column `answer` (named without a default, so it is required)."""
    return [float(len(text)) for text in answer]


def test_reward_columns_reach_the_reward_and_a_missing_one_fails_before_the_model_loads(tmp_path, model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there", "answer": "a"}\n{"prompt": "How are you?", "answer": "abc"}\n', encoding="utf-8")
    data = {"train_file": str(prompts), "validation_file": str(prompts), "max_train_samples": None, "max_validation_samples": None}
    rewards = [{"function": "tests.test_grpo:answer_length"}]
    run_dir = tmp_path / "run"
    build_trainer(_config(run_dir, model_dir, method={"rewards": rewards}, data=data,
                          training={"max_steps": 1, "eval_steps": 100})).train()
    (row,) = [row for row in runfolder.read_jsonl(run_dir / runfolder.METRICS) if "loss" in row]
    assert row["reward"] == (1 + 3) / 2  # both prompts in the one step, each completion scored by its prompt's answer

    prompts.write_text('{"prompt": "Hello there", "answer": "a"}\n{"prompt": "How are you?", "solution": "abc"}\n', encoding="utf-8")
    for terms in (rewards, [{"function": "exact_match", "column": "answer"}]):
        with pytest.raises(DataError, match=r"prompts\.jsonl:2: reward '.*' needs the column 'answer'.*its columns: solution"):
            build_trainer(_config(tmp_path / "again", model_dir, method={"rewards": terms}, data=data))
    hh = _config(tmp_path / "hh", model_dir, method={"rewards": [{"function": "exact_match"}]})
    with pytest.raises(DataError, match=r"train\.jsonl:\d+: .*column 'answer'.*none besides the prompt"):
        build_trainer(hh)  # a paired file read as prompts has no columns
