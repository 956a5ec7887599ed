"""gradient_checkpointing: auto — the activation estimate against autograd's saved tensors, and the decision."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.logprobs.attention import query_block_key_ranges, runs_packed_cpu_attention
from preftune.logprobs.engine import engine_layout
from preftune.model.memory import estimate_activation_bytes, plan_gradient_checkpointing
from preftune.run import build_trainer
from tests.support import save_tiny_model, tiny_run_config

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _saved_activation_bytes(trainer, examples) -> tuple[int, int, int, int]:
    """Bytes of the distinct tensors autograd saves during one policy forward (parameters excluded), the bytes of
    the packed attention's block masks (kept by its nodes, not saved through autograd), and the batch shape."""
    batch = engine_layout(trainer.policy, trainer.layout.collate(examples, pad_id=trainer.pad_id))
    parameters = {p.untyped_storage().data_ptr() for p in trainer.policy.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    trainer.policy.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        trainer.policy_logps(batch).sum.sum().backward()
    rows, row_length = batch.input_ids.shape
    block_masks = query_block_key_ranges(batch.attention_mask).block_masks(batch.attention_mask, torch.float32)
    return sum(storages.values()), sum(m.nbytes for m in block_masks), rows, row_length


@pytest.mark.parametrize(
    "lora, dtype", [(LORA, "float32"), (LORA, "bfloat16"), (None, "float32")], ids=["lora", "lora-bf16-base", "full"]
)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_the_estimate_matches_the_saved_activations_of_a_real_step(tmp_path, model_dir, lora, dtype, checkpointing):
    config = tiny_run_config(
        tmp_path / "run", model_dir, model={"name_or_path": str(model_dir), "lora": lora, "dtype": dtype},
        training={"per_device_train_batch_size": 8, "gradient_checkpointing": checkpointing, "reference_cache": False},
    )
    trainer = build_trainer(config)
    measured, block_mask_bytes, rows, row_length = _saved_activation_bytes(trainer, trainer.data.train[:8])
    model = trainer.policy if lora is None else trainer.policy.get_base_model()
    assert runs_packed_cpu_attention(model, "cpu")  # the tests' tiny models load with preftune's packed attention
    estimate = estimate_activation_bytes(
        model.config,
        rows=rows, row_length=row_length, lora_rank=lora["r"] if lora else None, lora_targets=2 if lora else 0,
        low_precision_mlp=dtype == "bfloat16", packed_attention=True,
    )
    # With checkpointing the recomputed layer's tensors are saved inside backward, under the checkpoint's own
    # hooks; what these hooks see through the forward is the layer inputs.
    predicted = estimate.layer_input_bytes if checkpointing else estimate.stored_bytes - estimate.attention_mask_bytes
    # What the formula leaves out (RoPE tables, the LM head's answer states) is a few percent on this model.
    assert 0.85 * measured <= predicted <= 1.15 * measured, (predicted, measured)
    # What the run's plan bounds it with (preftune/train/setup.py: a row per example, each as long as the longest):
    # the tokens, and the block masks, whose blocks see at most the longest example plus their own queries of keys.
    examples = trainer.data.train[:8]
    longest = max(len(e.prompt_ids) + sum(map(len, e.answer_ids)) for e in examples)
    bound = estimate_activation_bytes(
        model.config, rows=len(examples), row_length=longest, lora_rank=lora["r"] if lora else None,
        lora_targets=2 if lora else 0, low_precision_mlp=dtype == "bfloat16", packed_attention=True,
    )
    assert rows * row_length <= len(examples) * longest
    assert block_mask_bytes <= bound.attention_mask_bytes


def test_auto_turns_checkpointing_on_exactly_when_the_estimate_exceeds_the_budget(tmp_path, model_dir):
    def plan(budget_gb):
        config = tiny_run_config(tmp_path / f"run-{budget_gb}", model_dir, training={"memory_budget_gb": budget_gb})
        return build_trainer(config)

    roomy = plan(100.0)
    stored = roomy.parts.memory.estimate.stored_bytes
    assert roomy.parts.memory.gradient_checkpointing is False and not roomy.policy.is_gradient_checkpointing
    tight = plan(stored / 2 / 1e9)
    assert tight.parts.memory.gradient_checkpointing is True and tight.policy.is_gradient_checkpointing

    edge = plan_gradient_checkpointing("auto", roomy.parts.memory.estimate, budget_bytes=stored)
    assert edge.gradient_checkpointing is False  # fits exactly
    assert plan_gradient_checkpointing("auto", roomy.parts.memory.estimate, budget_bytes=stored - 1).gradient_checkpointing
    assert plan_gradient_checkpointing(True, roomy.parts.memory.estimate, budget_bytes=None).gradient_checkpointing


def test_the_decision_and_the_estimate_are_written_to_run_json(tmp_path, model_dir):
    config = tiny_run_config(tmp_path / "run", model_dir, training={"max_steps": 1, "eval_steps": 1, "memory_budget_gb": 100.0})
    trainer = build_trainer(config)
    trainer.train()
    record = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert record["memory"]["gradient_checkpointing"] is False and record["memory"]["setting"] == "auto"
    assert record["memory"]["budget_gb"] == 100.0 and record["memory"]["activation_gb_stored"] > 0
    longest = max(len(e.prompt_ids) + sum(map(len, e.answer_ids)) for e in trainer.data.train)
    assert record["memory"]["largest_micro_batch_bound"] == {"rows": 4, "row_length": longest}
    assert record["precision"]["base_dtype"] == "float32"
