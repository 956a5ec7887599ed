"""4-bit NF4 base (`model.load_in_4bit`, QLoRA through bitsandbytes): what is quantised, that it computes what its
dequantised weights compute, that LoRA gradients reach the adapters through it, and that a run trains and exports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.config import validate_config
from preftune.data.collate import collate_pairs
from preftune.errors import ConfigError, ModelError
from preftune.logprobs import sequence_logps
from preftune.logprobs.cache import open_reference_cache
from preftune.losses.dpo import dpo_loss
from preftune.model import quantization
from preftune.model.loading import load_model
from preftune.model.lora import apply_lora
from preftune.model.quantization import dequantize_into_fp32, four_bit_linears, is_four_bit
from preftune.model.reference import ReferenceModel
from preftune.run import build_trainer
from preftune.train.distributed import plan_distribution
from tests.support import load_test_tokenizer, resident_bytes_of, tiny_llama, tiny_run_config, tokenized_hh_pairs

bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (hidden 64: one NF4 block of 64 weights per input row) saved with the test tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-model-64")
    tokenizer = load_test_tokenizer()
    tiny_llama(len(tokenizer), hidden_size=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_test_tokenizer()
    return collate_pairs(tokenized_hh_pairs(tokenizer, read=4), pad_id=tokenizer.pad_token_id)


def _lora(model, seed: int = 0):
    torch.manual_seed(seed)
    adapted = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=LORA["target_modules"])
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; random B makes the adapter's path (and its A gradient) nonzero
            torch.nn.init.normal_(parameter, std=0.1)
    return adapted


def _dpo_gradients(policy, reference: ReferenceModel, batch) -> dict[str, torch.Tensor]:
    policy.zero_grad(set_to_none=True)
    reference_logps = reference.logps(batch).sum
    policy_logps = sequence_logps(policy, batch).sum
    half = batch.num_examples
    loss = dpo_loss(policy_logps[:half], policy_logps[half:], reference_logps[:half], reference_logps[half:], beta=0.1).losses.mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad and p.grad is not None}


def test_every_decoder_linear_is_nf4_and_the_head_and_embeddings_stay_fp32(model_dir):
    model = load_model(str(model_dir), four_bit_compute_dtype="bfloat16")
    layers = four_bit_linears(model)
    decoder_linears = 2 * 7  # q, k, v, o, gate, up, down per layer, 2 layers
    assert len(layers) == decoder_linears and all(layer in set(model.model.modules()) for layer in layers)
    for layer in layers:
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == layer.in_features * layer.out_features
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantisation
        assert layer.compute_dtype == torch.bfloat16
        assert layer.support_avx512bf16_for_cpu is False  # kept in the trainable layout (quantization.py)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    plain = load_model(str(model_dir))
    assert not is_four_bit(plain) and is_four_bit(model)


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads the process's mappings from Linux's /proc")
def test_quantising_drops_the_checkpoint_pages_it_read_and_keeps_the_rest_in_fp32(tmp_path):
    tokenizer = load_test_tokenizer()
    tiny_llama(len(tokenizer), hidden_size=512, layers=2).save_pretrained(tmp_path)  # ~19 MB of fp32 linears
    checkpoint = (tmp_path / "model.safetensors").resolve()
    model = load_model(str(tmp_path), four_bit_compute_dtype="bfloat16")
    linear_bytes = sum(layer.in_features * layer.out_features * 4 for layer in four_bit_linears(model))
    assert resident_bytes_of(checkpoint) <= checkpoint.stat().st_size - 0.95 * linear_bytes
    assert {p.dtype for n, p in model.named_parameters() if "embed" in n or "norm" in n} == {torch.float32}
    assert model.model.embed_tokens.weight.abs().sum() > 0  # what stays fp32 still reads through the mapping


def test_the_4bit_model_computes_what_its_dequantised_weights_compute(model_dir, batch):
    """With fp32 compute, each 4-bit matmul is a matmul with the dequantised weight: the log-probs match an fp32
    model holding those weights; and NF4 is close to, but not, the original weights."""
    four_bit = load_model(str(model_dir), four_bit_compute_dtype="float32")
    dequantised = copy.deepcopy(four_bit)
    dequantize_into_fp32(dequantised)
    assert not is_four_bit(dequantised)
    original = load_model(str(model_dir))
    with torch.no_grad():
        ours, theirs, full = (sequence_logps(m, batch).sum for m in (four_bit, dequantised, original))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert not torch.allclose(ours, full, atol=1e-3)  # the weights really are quantised
    torch.testing.assert_close(ours, full, rtol=0, atol=0.05 * full.abs().max().item())


def _gradients_beside_the_dequantised_twin(four_bit, base, batch, device: str = "cpu"):
    """LoRA gradients of the 4-bit `four_bit` (twice, a reference forward between) and of `base` dequantised to fp32."""
    policy = _lora(four_bit).to(device)
    dequantize_into_fp32(base)
    twin = _lora(base).to(device)
    batch = batch.to(device)
    first = _dpo_gradients(policy, ReferenceModel(policy, chunk_size=64), batch)
    again = _dpo_gradients(policy, ReferenceModel(policy, chunk_size=64), batch)
    expected = _dpo_gradients(twin, ReferenceModel(twin, chunk_size=64), batch)
    assert len(first) == len(expected) == 8 and all(g.abs().sum() > 0 for g in first.values())
    return first, again, expected


def test_lora_gradients_through_the_4bit_base_equal_the_dequantised_models_and_survive_the_reference_forward(model_dir, batch):
    """The reference forward (eval mode, no grad) must not change how later training forwards run: bitsandbytes would
    repack the weights for inference there, and every LoRA gradient behind it would silently vanish."""
    first, again, expected = _gradients_beside_the_dequantised_twin(
        *(load_model(str(model_dir), four_bit_compute_dtype="float32") for _ in range(2)), batch
    )
    for name, gradient in expected.items():
        torch.testing.assert_close(first[name], gradient, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' CUDA kernels need a GPU")
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_on_cuda_the_4bit_base_is_quantised_on_the_gpu_and_trains_like_its_dequantised_weights(model_dir, batch, compute_dtype):
    """Quantised layer by layer onto the GPU (nothing left on the CPU), then the same checks as on CPU: log-probs and
    LoRA gradients of the dequantised twin, and gradients unchanged by a reference forward in between."""
    four_bit, base = (load_model(str(model_dir), four_bit_compute_dtype=compute_dtype, device="cuda") for _ in range(2))
    assert {layer.weight.device.type for layer in four_bit_linears(four_bit)} == {"cuda"}
    # load_model quantises onto the device; the embeddings, norms and head move with the rest, as a trainer moves them.
    first, again, expected = _gradients_beside_the_dequantised_twin(four_bit, base, batch, device="cuda")
    for name, gradient in expected.items():
        scale = gradient.abs().max().item()
        if compute_dtype == "float32":
            torch.testing.assert_close(first[name], gradient, rtol=1e-3, atol=1e-6)
        else:  # bf16 compute rounds each matmul's input; the fp32 twin does not
            torch.testing.assert_close(first[name], gradient, rtol=0.1, atol=0.02 * scale)
        torch.testing.assert_close(again[name], first[name], rtol=1e-5, atol=1e-6 * scale)


def test_a_4bit_run_trains_its_adapters_and_exports_an_fp32_merge_of_what_it_trained(tmp_path, model_dir):
    config = tiny_run_config(
        tmp_path / "run", model_dir, model={"name_or_path": str(model_dir), "dtype": "float32", "load_in_4bit": True, "lora": LORA},
        training={"max_steps": 2, "eval_steps": 2},
    )
    trainer = build_trainer(config)
    precision = trainer.identity["precision"]
    assert precision["load_in_4bit"] is True and precision["parameters_by_dtype"]["uint8"] > 0
    frozen_before = {n: p.clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert result.state.global_step == 2
    assert all(torch.equal(p, frozen_before[n]) for n, p in trainer.policy.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, adapters_before[n]) for n, p in trainer.policy.named_parameters() if "lora_A" in n)

    merged_dir = result.run_dir / "final" / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    batch = collate_pairs(trainer.data.validation[:4], pad_id=trainer.pad_id)
    trainer.policy.eval()
    with torch.no_grad():
        trained, exported = sequence_logps(trainer.policy, batch).sum, sequence_logps(merged, batch).sum
    torch.testing.assert_close(exported, trained, rtol=0, atol=1e-3)


def test_4bit_bases_computing_in_other_dtypes_never_share_reference_cache_entries(tmp_path, model_dir):
    keys = {
        dtype: open_reference_cache(_lora(load_model(str(model_dir), four_bit_compute_dtype=dtype)), root=tmp_path).key
        for dtype in ("float32", "bfloat16")
    }
    plain = open_reference_cache(_lora(load_model(str(model_dir))), root=tmp_path).key
    assert len({*keys.values(), plain}) == 3


def test_4bit_settings_that_cannot_work_are_refused_with_the_reason(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="load_in_4bit with lora: null"):
        validate_config({"model": {"load_in_4bit": True, "lora": None}})
    with pytest.raises(ConfigError, match="load_in_4bit: loss_type reward_model"):
        validate_config({"model": {"load_in_4bit": True}, "method": {"loss_type": "reward_model"}})
    config = validate_config({"model": {"load_in_4bit": True}, "training": {"fsdp": True}})
    with pytest.raises(ConfigError, match="fsdp with model.load_in_4bit"):
        plan_distribution(config, processes=2, device=torch.device("cpu"))
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install bitsandbytes"):
        load_model(str(tmp_path / "never-read"), four_bit_compute_dtype="bfloat16")
