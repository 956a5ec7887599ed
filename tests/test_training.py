"""End-to-end training behaviour of the DPO trainer on a tiny random model and real hh-rlhf pairs."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from preftune.data.collate import collate_pairs
from preftune.logprobs import sequence_logps
from preftune.run import build_trainer
from tests.support import save_tiny_model, tiny_run_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _snapshot(model, *, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


def test_lora_run_updates_every_adapter_weight_and_leaves_the_base_bit_identical(tmp_path, model_dir):
    trainer = build_trainer(tiny_run_config(tmp_path / "run", model_dir))
    assert trainer.reference.kind.startswith("adapter-disabled")
    before_trainable = _snapshot(trainer.policy, trainable=True)
    before_frozen = _snapshot(trainer.policy, trainable=False)
    trainer.train()
    after_trainable = _snapshot(trainer.policy, trainable=True)
    after_frozen = _snapshot(trainer.policy, trainable=False)
    assert before_trainable and all("lora_" in name for name in before_trainable)
    unchanged = [n for n in before_trainable if torch.equal(before_trainable[n], after_trainable[n])]
    assert unchanged == []
    assert all(torch.equal(before_frozen[n], after_frozen[n]) for n in before_frozen)


def test_full_finetune_changes_every_weight_and_keeps_a_frozen_reference(tmp_path, model_dir):
    trainer = build_trainer(tiny_run_config(tmp_path / "run", model_dir, model={"name_or_path": str(model_dir), "lora": None}))
    assert trainer.reference.kind.startswith("frozen copy")
    reference_before = {n: p.clone() for n, p in trainer.reference.model.named_parameters()}
    policy_before = _snapshot(trainer.policy, trainable=True)
    trainer.train()
    assert all(torch.equal(p, reference_before[n]) for n, p in trainer.reference.model.named_parameters())
    policy_after = _snapshot(trainer.policy, trainable=True)
    assert [n for n in policy_before if torch.equal(policy_before[n], policy_after[n])] == []


def test_overfitting_a_small_set_lowers_the_loss_and_raises_preference_accuracy(tmp_path, model_dir):
    config = tiny_run_config(
        tmp_path / "run",
        model_dir,
        data={"max_train_samples": 8},
        training={"max_steps": 12, "per_device_train_batch_size": 4, "learning_rate": 2e-2, "eval_steps": 12},
    )
    trainer = build_trainer(config)
    trainer.data.validation = trainer.data.train  # measure on the training pairs themselves
    result = trainer.train()
    assert result.final_eval["eval/loss"] < result.first_eval["eval/loss"] - 0.05
    assert result.final_eval["eval/rewards/accuracies"] >= 0.75 > result.first_eval["eval/rewards/accuracies"]
    assert result.final_eval["eval/logps/chosen"] - result.final_eval["eval/logps/rejected"] > (
        result.first_eval["eval/logps/chosen"] - result.first_eval["eval/logps/rejected"]
    )


def _gradients_of_first_step(
    tmp_path, model_dir, batch_size: int, accumulation: int, *, lora=None, **training
) -> tuple[list[torch.Tensor], int]:
    """The gradients of the first optimiser step, and the bytes autograd saved for backward during it."""
    config = tiny_run_config(
        tmp_path / f"run-{batch_size}x{accumulation}-{len(list(tmp_path.iterdir()))}",
        model_dir,
        model={"name_or_path": str(model_dir), "lora": lora},
        training={
            "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": accumulation,
            "max_grad_norm": None,
            **training,
        },
    )
    trainer = build_trainer(config)
    captured = []
    trainer.optimizer.step = lambda: captured.extend(p.grad.clone() for p in trainer.trainable)
    saved_bytes = []  # what autograd keeps for backward during the step

    def keep(tensor):
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        trainer.optimizer_step(trainer.step_micro_batches(epoch=0, step_in_epoch=0))
    return captured, sum(saved_bytes)


def test_gradient_accumulation_is_invariant(tmp_path, model_dir):
    one_big, _ = _gradients_of_first_step(tmp_path, model_dir, batch_size=4, accumulation=1)
    four_small, _ = _gradients_of_first_step(tmp_path, model_dir, batch_size=1, accumulation=4)
    assert len(one_big) == len(four_small) > 0
    for big, small in zip(one_big, four_small):
        torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in one_big)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_stored_activation_gradients(tmp_path, model_dir, lora):
    stored, stored_bytes = _gradients_of_first_step(tmp_path, model_dir, 4, 1, lora=lora, gradient_checkpointing=False)
    recomputed, recomputed_bytes = _gradients_of_first_step(tmp_path, model_dir, 4, 1, lora=lora, gradient_checkpointing=True)
    assert recomputed_bytes < 0.5 * stored_bytes  # the decoder layers' activations were not kept
    assert len(stored) == len(recomputed) > 0 and any(g.abs().sum() > 0 for g in stored)
    for plain, checkpointed in zip(stored, recomputed):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run_exactly(tmp_path, model_dir):
    straight = build_trainer(tiny_run_config(tmp_path / "straight", model_dir, training={"max_steps": 4, "save_steps": 2}))
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-2"
    assert (checkpoint / "trainable.safetensors").is_file()

    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / "step-2")
    resumed = build_trainer(
        tiny_run_config(tmp_path / "resumed", model_dir, resume_from="latest", training={"max_steps": 4, "save_steps": 2})
    )
    resumed.train()
    assert resumed.state.global_step == 4
    for (name, a), (_, b) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), name


def test_merged_export_reloads_with_the_trained_policys_log_probs(tmp_path, model_dir):
    trainer = build_trainer(tiny_run_config(tmp_path / "run", model_dir))
    trainer.train()
    batch = collate_pairs(trainer.data.validation[:4], pad_id=trainer.pad_id)
    trainer.policy.eval()
    with torch.no_grad():
        trained = sequence_logps(trainer.policy, batch).sum
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "merged").eval()
        from_merged = sequence_logps(merged, batch).sum
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        from_adapter = sequence_logps(PeftModel.from_pretrained(base, tmp_path / "run" / "final" / "adapter").eval(), batch).sum
    torch.testing.assert_close(from_merged, trained, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(from_adapter, trained, rtol=1e-5, atol=1e-5)
