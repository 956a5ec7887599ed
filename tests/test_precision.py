"""bf16 frozen base (`model.dtype`): what is stored low, what stays fp32, and how close it computes to fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.config import validate_config
from preftune.data.collate import collate_pairs
from preftune.errors import ConfigError
from preftune.logprobs import sequence_logps
from preftune.logprobs.attention import PACKED_SDPA
from preftune.logprobs.cache import open_reference_cache
from preftune.model.lora import apply_lora
from preftune.model.precision import (
    LowPrecisionGatedMLP,
    bf16_matmul_supported,
    cpu_flags,
    resolve_base_dtype,
    runs_low_precision_mlps,
    store_frozen_linears,
)
from preftune.model.loading import load_model
from preftune.run import build_trainer
from tests.support import load_test_tokenizer, resident_bytes_of, save_tiny_model, tiny_llama, tiny_run_config

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
# Tiny random model, 96-token rows: per-sequence log-prob sums of about -200 agree to this (measured 4e-3).
LOGP_ATOL = 0.05


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def test_cpu_flags_are_read_from_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\nbugs\t: none\n", encoding="utf-8")
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()


def test_auto_picks_bf16_only_with_lora_on_bf16_hardware_and_full_fine_tunes_refuse_low_precision():
    assert resolve_base_dtype("auto", lora=True) == ("bfloat16" if bf16_matmul_supported() else "float32")
    assert resolve_base_dtype("auto", lora=False) == "float32"
    assert resolve_base_dtype("float32", lora=True) == "float32"
    with pytest.raises(ConfigError, match="no fp32 master copy"):
        resolve_base_dtype("bfloat16", lora=False)
    with pytest.raises(ConfigError, match="model"):
        validate_config({"model": {"dtype": "bfloat16", "lora": None}})
    assert validate_config({}).model.dtype == "auto"


def _trainer(tmp_path, model_dir, dtype: str, name: str):
    config = tiny_run_config(
        tmp_path / name, model_dir, model={"name_or_path": str(model_dir), "dtype": dtype, "lora": LORA},
        training={"max_steps": 2, "eval_steps": 2, "reference_cache": False},
    )
    return build_trainer(config)


def test_bf16_base_trains_with_fp32_adapters_and_optimiser_and_log_probs_near_fp32(tmp_path, model_dir):
    fp32 = _trainer(tmp_path, model_dir, "float32", "fp32")
    bf16 = _trainer(tmp_path, model_dir, "bfloat16", "bf16")
    dtypes = {name: p.dtype for name, p in bf16.policy.named_parameters()}
    assert {dtypes[n] for n in dtypes if "lora_" in n} == {torch.float32}
    assert {dtypes[n] for n in dtypes if "_proj.base_layer" in n or ("mlp" in n and "lora_" not in n)} == {torch.bfloat16}
    assert dtypes["base_model.model.lm_head.weight"] == dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert bf16.identity["precision"]["base_dtype"] == "bfloat16"

    batch = collate_pairs(fp32.data.train[:4], pad_id=fp32.pad_id)
    with torch.no_grad():
        reference32, reference16 = fp32.reference.logps(batch).sum, bf16.reference.logps(batch).sum
    assert reference16.dtype == torch.float32
    torch.testing.assert_close(reference16, reference32, rtol=0, atol=LOGP_ATOL)
    assert not torch.equal(reference16, reference32)  # the base really computed in bf16

    frozen_before = {n: p.clone() for n, p in bf16.policy.named_parameters() if not p.requires_grad}
    result = bf16.train()
    assert result.state.global_step == 2 and all(torch.isfinite(p).all() for p in bf16.trainable)
    states = [state for state in bf16.optimizer.state.values()]
    assert states and {t.dtype for s in states for k, t in s.items() if k != "step"} == {torch.float32}
    assert all(torch.equal(p, frozen_before[n]) for n, p in bf16.policy.named_parameters() if not p.requires_grad)


def test_the_fp32_path_is_the_plain_fp32_model_bit_for_bit(tmp_path, model_dir):
    trainer = _trainer(tmp_path, model_dir, "float32", "fp32")
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    torch.manual_seed(trainer.config.training.seed)
    # The same attention as a run's (preftune's packed sdpa): what differs is only what the precision code would touch.
    plain = apply_lora(
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=PACKED_SDPA), r=4, alpha=8, dropout=0.0,
        target_modules=LORA["target_modules"],
    )
    batch = collate_pairs(trainer.data.train[:4], pad_id=trainer.pad_id)
    ours, theirs = sequence_logps(trainer.policy, batch).sum, sequence_logps(plain, batch).sum
    assert torch.equal(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    ours_grads = [p.grad for p in trainer.policy.parameters() if p.requires_grad]
    theirs_grads = [p.grad for p in plain.parameters() if p.requires_grad]
    assert len(ours_grads) == len(theirs_grads) > 0 and all(torch.equal(a, b) for a, b in zip(ours_grads, theirs_grads))


def test_a_bf16_base_linear_takes_fp32_input_and_returns_fp32(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    assert store_frozen_linears(model, "bfloat16") == 2 * 7  # q, k, v, o, gate, up, down per layer
    linear = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, linear.in_features, requires_grad=True)
    y = linear(x)
    assert y.dtype == torch.float32 and linear.weight.dtype == torch.bfloat16
    expected = reference.model.layers[0].mlp.up_proj(x)
    assert (y - expected).norm() / expected.norm() < 2e-2  # bf16 rounding of inputs and weights
    y.sum().backward()
    assert x.grad.dtype == torch.float32


def test_the_fused_bf16_mlp_computes_what_its_three_cast_wrapped_linears_compute_and_saves_a_third(model_dir):
    """Forward and input gradient bit-identical to the module's own forward over the bf16 linears; saved: bf16 gate, up."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    store_frozen_linears(model, "bfloat16")
    mlp = model.model.layers[0].mlp
    x = torch.randn(37, mlp.gate_proj.in_features)
    upstream = torch.randn(37, mlp.down_proj.out_features)
    results = {}
    for name, forward in (("fused", mlp.forward), ("linears", lambda t: type(mlp).forward(mlp, t))):
        inputs = x.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            output = forward(inputs)
        (output * upstream).sum().backward()
        activations = [t for t in saved if t.shape[0] == 37]  # weights are saved too; they are not activations
        results[name] = output.detach(), inputs.grad, sum(t.numel() * t.element_size() for t in activations)
    assert results["fused"][0].dtype == torch.float32
    assert torch.equal(results["fused"][0], results["linears"][0]) and torch.equal(results["fused"][1], results["linears"][1])
    intermediate = mlp.gate_proj.out_features
    assert results["fused"][2] == 37 * 2 * intermediate * 2  # gate and up, bf16
    assert results["linears"][2] >= 37 * 3 * intermediate * 4  # gate, up and silu(gate), fp32
    assert runs_low_precision_mlps(model)


def test_an_mlp_with_lora_adapters_keeps_its_own_forward_and_trains_them(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    store_frozen_linears(model, "bfloat16")
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["up_proj"])
    assert not runs_low_precision_mlps(model)
    calls = []
    original = LowPrecisionGatedMLP.apply
    LowPrecisionGatedMLP.apply = lambda *args: calls.append(1) or original(*args)
    try:
        model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    finally:
        LowPrecisionGatedMLP.apply = original
    assert not calls
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_bf16_and_fp32_bases_never_share_reference_cache_entries(tmp_path, model_dir):
    fp32 = AutoModelForCausalLM.from_pretrained(model_dir)
    bf16 = AutoModelForCausalLM.from_pretrained(model_dir)
    store_frozen_linears(bf16, "bfloat16")
    key32 = open_reference_cache(fp32, root=tmp_path).key
    key16 = open_reference_cache(bf16, root=tmp_path).key
    assert key32 != key16
    assert open_reference_cache(AutoModelForCausalLM.from_pretrained(model_dir), root=tmp_path).key == key32


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads the process's mappings from Linux's /proc")
@pytest.mark.parametrize("drop", [True, False], ids=["store_frozen_linears", "plain-conversion"])
def test_converting_a_mapped_fp32_checkpoint_drops_the_pages_it_read(tmp_path, drop):
    """The fp32 pages of the converted linears leave the process; the values converted are the checkpoint's, exactly."""
    tokenizer = load_test_tokenizer()
    tiny_llama(len(tokenizer), hidden_size=512, layers=2).save_pretrained(tmp_path)  # ~19 MB of fp32 linears
    checkpoint = (tmp_path / "model.safetensors").resolve()
    model = load_model(str(tmp_path))
    expected = {n: p.detach().to(torch.bfloat16) for n, p in model.model.layers.named_parameters() if p.dim() == 2}
    linear_bytes = sum(p.numel() * 4 for p in expected.values())
    if drop:
        store_frozen_linears(model, "bfloat16")
    else:  # the same conversion, which leaves the pages it read resident
        for module in model.model.layers.modules():
            if type(module) is torch.nn.Linear:
                module.to(torch.bfloat16)
    resident = resident_bytes_of(checkpoint)
    for name, parameter in model.model.layers.named_parameters():
        if name in expected:
            assert torch.equal(parameter, expected[name]), name
    if drop:
        assert resident <= checkpoint.stat().st_size - 0.95 * linear_bytes, (resident, linear_bytes)
        assert model.model.embed_tokens.weight.abs().sum() > 0  # what stays fp32 still reads through the mapping
    else:
        assert resident >= linear_bytes, (resident, linear_bytes)
