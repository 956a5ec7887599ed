"""The on-disk reference log-prob cache: hits, misses, invalidation, atomic shards, and training with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.data.collate import collate_pairs
from preftune.logprobs.cache import ReferenceCacheError, ReferenceLogpsCache, example_keys, open_reference_cache
from preftune.model.lora import apply_lora
from preftune.model.reference import ReferenceModel
from preftune.run import build_trainer
from tests.support import load_test_tokenizer, save_tiny_model, tiny_llama, tiny_run_config, tokenized_hh_pairs


@pytest.fixture(scope="module")
def tokenizer():
    return load_test_tokenizer()


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return tokenized_hh_pairs(tokenizer, read=12)[:6]


def _reference(model):
    return ReferenceModel(model, chunk_size=64).logps


def _key(model, **settings):
    return open_reference_cache(model, root="unused", mixed_precision=settings.get("mixed_precision", "no")).key


def test_a_miss_computes_and_a_hit_returns_the_same_values_whatever_the_batching(tmp_path, pairs, tokenizer):
    model = tiny_llama(len(tokenizer))
    cache = ReferenceLogpsCache(tmp_path, "k")
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    computed = cache.logps(batch, _reference(model))
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, len(pairs))

    again = cache.logps(batch, _reference(model))
    assert (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(again.sum, computed.sum, rtol=0, atol=0)
    torch.testing.assert_close(again.count, computed.count, rtol=0, atol=0)

    # Other batch composition and order: still hits, and matches computing that batch from scratch.
    regrouped = collate_pairs(pairs[4:1:-1], pad_id=tokenizer.pad_token_id)
    from_cache = cache.logps(regrouped, _reference(model))
    assert cache.hits == 2
    fresh = _reference(model)(regrouped)
    torch.testing.assert_close(from_cache.sum, fresh.sum, rtol=1e-5, atol=1e-4)
    assert from_cache.count.tolist() == fresh.count.tolist()


def test_a_hit_here_is_computed_when_another_process_missed(tmp_path, pairs, tokenizer):
    """Under FSDP the reference runs on every process or on none (each forward gathers weights from all):
    `all_processes_hit` says whether every process hit, and a local hit then computes like a miss."""
    model = tiny_llama(len(tokenizer))
    batch = collate_pairs(pairs[:3], pad_id=tokenizer.pad_token_id)
    asked = []
    others_missed = ReferenceLogpsCache(tmp_path, "k", all_processes_hit=lambda hit: asked.append(hit) or False)
    calls = []

    def compute(b):
        calls.append(b)
        return _reference(model)(b)

    first = others_missed.logps(batch, compute)
    again = others_missed.logps(batch, compute)
    assert asked == [False, True]  # the second batch was a local hit ...
    assert len(calls) == 2 and (others_missed.hits, others_missed.misses) == (0, 2)  # ... computed anyway
    torch.testing.assert_close(again.sum, first.sum, rtol=0, atol=0)
    everyone_hit = ReferenceLogpsCache(tmp_path, "k", all_processes_hit=lambda hit: hit)
    everyone_hit._entries = dict(others_missed._entries)
    everyone_hit.logps(batch, compute)
    assert len(calls) == 2 and everyone_hit.hits == 1


def test_changed_tokens_miss(tmp_path, pairs, tokenizer):
    model = tiny_llama(len(tokenizer))
    cache = ReferenceLogpsCache(tmp_path, "k")
    cache.logps(collate_pairs(pairs[:3], pad_id=tokenizer.pad_token_id), _reference(model))
    edited = dataclasses.replace(pairs[0], answer_ids=(pairs[0].chosen_ids, pairs[0].rejected_ids[:-1]))
    cut_prompt = dataclasses.replace(pairs[1], prompt_ids=pairs[1].prompt_ids[1:])
    swapped = dataclasses.replace(pairs[2], answer_ids=(pairs[2].rejected_ids, pairs[2].chosen_ids))
    for changed in (edited, cut_prompt, swapped):
        before = cache.misses
        cache.logps(collate_pairs([changed], pad_id=tokenizer.pad_token_id), _reference(model))
        assert cache.misses == before + 1
    assert len(set(example_keys(collate_pairs([pairs[0], edited, cut_prompt, swapped], pad_id=0)))) == 4


def test_entries_persist_across_instances_in_atomic_shards(tmp_path, pairs, tokenizer):
    model = tiny_llama(len(tokenizer))
    first = ReferenceLogpsCache(tmp_path, "k", description={"model": "tiny"})
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    computed = first.logps(batch, _reference(model))
    shard = first.flush()
    assert shard is not None and shard.is_file() and first.flush() is None  # nothing new, nothing written
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == sorted([shard.name, "key.json"])  # no staging files left

    second = ReferenceLogpsCache(tmp_path, "k")
    assert len(second) == len(pairs)
    again = second.logps(batch, _reference(model))
    assert (second.hits, second.misses) == (1, 0)
    torch.testing.assert_close(again.sum, computed.sum, rtol=0, atol=0)

    # A second writer adds its own shard; a reader sees both.
    third = ReferenceLogpsCache(tmp_path, "k")
    third.logps(collate_pairs([dataclasses.replace(pairs[0], answer_ids=(pairs[0].chosen_ids[:-1], pairs[0].rejected_ids))], pad_id=0), _reference(model))
    third.flush()
    assert len(ReferenceLogpsCache(tmp_path, "k")) == len(pairs) + 1


def test_a_damaged_shard_is_a_clear_error(tmp_path):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ReferenceCacheError, match=r"broken\.safetensors.*delete it"):
        ReferenceLogpsCache(tmp_path, "k")


def test_the_key_follows_the_reference_weights_not_the_adapter(tmp_path, tokenizer):
    base = tiny_llama(len(tokenizer), seed=0)
    key = _key(base)
    assert _key(tiny_llama(len(tokenizer), seed=0)) == key  # same weights, another object

    # LoRA: the reference is the base under the adapter; adapter shape, targets and training do not matter.
    lora = apply_lora(tiny_llama(len(tokenizer), seed=0), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    other_lora = apply_lora(tiny_llama(len(tokenizer), seed=0), r=2, alpha=2, dropout=0.0, target_modules=["k_proj"])
    assert _key(lora) == _key(other_lora) == key
    with torch.no_grad():
        next(p for n, p in lora.named_parameters() if "lora_B" in n).add_(1.0)
    assert _key(lora) == key

    # Another checkpoint saved at the same path is another reference.
    folder = tmp_path / "model"
    save_tiny_model(folder, seed=0)
    at_path = _key(AutoModelForCausalLM.from_pretrained(folder))
    save_tiny_model(folder, seed=1)
    assert _key(AutoModelForCausalLM.from_pretrained(folder)) != at_path

    nudged = tiny_llama(len(tokenizer), seed=0)
    with torch.no_grad():
        nudged.model.norm.weight[0] += 1e-6
    assert _key(nudged) != key
    reconfigured = tiny_llama(len(tokenizer), seed=0)
    reconfigured.config.rope_parameters = {**reconfigured.config.rope_parameters, "rope_theta": 500.0}
    assert _key(reconfigured) != key
    assert _key(base, mixed_precision="bf16") != key
    assert _key(tiny_llama(len(tokenizer), seed=0).to(torch.bfloat16)) != key


def test_training_with_the_cache_matches_training_without_and_reuses_it(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    cache_dir = tmp_path / "reference-logps"

    def run(name: str, reference_cache: bool):
        config = tiny_run_config(
            tmp_path / name, model_dir,
            training={"max_steps": 3, "eval_steps": 3, "reference_cache": reference_cache, "reference_cache_dir": str(cache_dir)},
        )
        torch.manual_seed(0)  # the LoRA init draws from the global generator
        trainer = build_trainer(config)
        trainer.train()
        return trainer

    plain = run("plain", reference_cache=False)
    assert plain.reference_cache is None and not cache_dir.exists()
    cold = run("cold", reference_cache=True)
    assert cold.reference_cache.misses > 0  # every training batch; the validation batch hits on its second evaluation
    warm = run("warm", reference_cache=True)
    assert warm.reference_cache.misses == 0
    assert warm.reference_cache.hits == cold.reference_cache.hits + cold.reference_cache.misses

    for trainer in (cold, warm):
        for (name, expected), (_, actual) in zip(plain.policy.named_parameters(), trainer.policy.named_parameters()):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        assert trainer.state.eval_history[-1]["eval/loss"] == pytest.approx(plain.state.eval_history[-1]["eval/loss"], abs=1e-5)


def test_evaluation_compares_policy_and_reference_within_this_process_not_through_the_disk_cache(tmp_path):
    """With a bf16 base another process's cached log-probs differ from this process's forward by float noise;
    validation must not compare the policy against them: at step 0 (policy = reference) every margin is exactly 0."""
    from safetensors.torch import load_file, save_file

    from preftune.runfolder import read_run

    model_dir = save_tiny_model(tmp_path / "model")
    cache_dir = tmp_path / "reference-logps"

    def run(name: str):
        config = tiny_run_config(
            tmp_path / name, model_dir,
            training={"max_steps": 1, "eval_steps": 1, "reference_cache_dir": str(cache_dir)},
        )
        torch.manual_seed(0)
        trainer = build_trainer(config)
        trainer.train()
        return trainer

    run("first")
    for shard in cache_dir.rglob("*.safetensors"):  # chosen answers shifted: what another process's arithmetic could differ by
        tensors = load_file(shard)
        tensors["sums"][:, 0] += 0.5
        save_file(tensors, shard)
    second = run("second")
    assert second.reference_cache.hits > 0  # training did read the shifted entries
    before = read_run(tmp_path / "second").evaluations[0]
    assert before and all(row["rewards/margins"] == 0.0 for row in before)
