"""Where the frozen base weights live in bf16: `model.dtype` resolved, and the decoder's linear layers stored low.

With LoRA the base weights never change, so they need no fp32 master copy: storing the decoder's
linear layers (attention and MLP projections) in bfloat16 halves their memory and runs their
matmuls on the CPU's bf16 units (`avx512_bf16`, AMX) or the GPU's tensor cores. Everything else
stays fp32: the residual stream, the norms, attention's softmax, the embeddings and the LM head
(so answer log-probs come from fp32 logits), the LoRA weights (peft keeps adapters fp32), their
gradients, the optimiser state and every loss reduction. A low-precision linear casts its input
to the weight dtype and its output back to the input's dtype, so x @ A of the adapter next to it
runs in fp32 on the fp32 activations.

A gated MLP (Llama-style `down(silu(gate(x)) * up(x))`) whose three projections are all stored low
runs as one autograd function, `LowPrecisionGatedMLP`: the same arithmetic as the three cast-wrapped
linears (bf16 matmuls, the SiLU and the product in fp32), but it casts its input once and keeps
only the bf16 gate and up outputs for backward, recomputing the SiLU there. That is 2 bf16
tensors of the intermediate size per token instead of 3 fp32 ones (the largest saved activations
of the layer), and fewer [tokens, intermediate] passes through memory. An MLP whose projections
carry LoRA adapters keeps the module's own forward.

A full fine-tune (`model.lora: null`) trains the base itself, and bf16 weights under an fp32
AdamW lose every update smaller than a bf16 ulp: it stays fp32 (see `resolve_base_dtype`).
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError
from preftune.model.mapped_pages import checkpoint_mappings, drop_mapped_pages

LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products; avx512 alone only emulates them


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is absent, e.g. macOS)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_matmul_supported(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls run natively: CUDA `is_bf16_supported()`, or a CPU with avx512_bf16 / AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS)


def resolve_base_dtype(requested: str, *, lora: bool, device: torch.device | str = "cpu") -> str:
    """`model.dtype` → the storage dtype of the frozen decoder linears: float32, bfloat16 or float16.

    `auto` is bfloat16 with LoRA on hardware with native bf16 matmuls, float32 otherwise. A
    low-precision dtype without LoRA is refused: the weights would be trained without fp32 masters.
    """
    if requested == "auto":
        return "bfloat16" if lora and bf16_matmul_supported(device) else "float32"
    if requested in LOW_PRECISION and not lora:
        raise ConfigError(
            f"model.dtype: {requested} with model.lora: null would train {requested} weights with no fp32 master copy "
            "(updates smaller than one ulp are lost). Use model.dtype: float32 (or auto) for a full fine-tune, "
            "with training.mixed_precision: bf16 for bf16 compute, or train a LoRA adapter on a low-precision base."
        )
    return requested


def store_frozen_linears(model: torch.nn.Module, dtype: str) -> int:
    """Store the decoder's linear layers in `dtype` (bfloat16/float16), frozen; returns how many were converted.

    Call before `apply_lora`, so peft wraps the converted layers and creates fp32 adapters beside
    them. The LM head and the embeddings are not in the decoder's layers and stay fp32. A no-op for float32.

    transformers maps a safetensors checkpoint into memory and its fp32 parameters are views of the
    mapping: converting a layer reads its pages, which would then stay resident (and counted in
    the process's RSS) for as long as any parameter keeps the mapping alive. Each converted layer's
    fp32 pages are dropped as soon as its low-precision copy exists (preftune/model/mapped_pages.py), so the
    conversion peaks at the low-precision model plus one layer, not the fp32 file plus the copies.
    """
    if dtype == "float32":
        return 0
    low = LOW_PRECISION[dtype]
    decoder = model.get_decoder()
    mapped = checkpoint_mappings()
    converted = 0
    for module in decoder.modules():
        if type(module) is torch.nn.Linear:
            module.requires_grad_(False)
            originals = [parameter.data for parameter in module.parameters()]  # keep the mapping alive until dropped
            module.to(low)
            for original in originals:
                drop_mapped_pages(original, mapped)
            del originals
            module.forward = types.MethodType(_low_precision_linear_forward, module)
            converted += 1
    for module in decoder.modules():
        if _is_silu_gated_mlp(module):
            module.forward = types.MethodType(_low_precision_gated_mlp_forward, module)
    return converted


def _low_precision_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # The matmul (forward, and the activation gradient in backward) runs in the weight dtype; the
    # activations around it stay in theirs, so norms, residuals and adapters see fp32.
    return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


_GATED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _is_silu_gated_mlp(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        all(isinstance(getattr(module, name, None), torch.nn.Linear) for name in _GATED_PROJECTIONS)
        and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation")
        and type(module).__name__.endswith("MLP")  # Llama, Mistral, Qwen2, ...: down(act(gate(x)) * up(x))
    )


def _projections_are_frozen_low_precision(mlp: torch.nn.Module) -> bool:
    # False e.g. with LoRA on the MLP (peft's layers wrap the projections) or after `upcast_frozen_linears`.
    return all(
        type(p) is torch.nn.Linear and p.weight.dtype in LOW_PRECISION.values()
        for p in (getattr(mlp, name) for name in _GATED_PROJECTIONS)
    )


def _low_precision_gated_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _projections_are_frozen_low_precision(self):
        return type(self).forward(self, x)
    gate, up, down = (getattr(self, name) for name in _GATED_PROJECTIONS)
    return LowPrecisionGatedMLP.apply(x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias)


def runs_low_precision_mlps(model: torch.nn.Module) -> bool:
    """True when the decoder's gated MLPs run as `LowPrecisionGatedMLP` (what the activation estimate needs to know)."""
    mlps = [m for m in model.modules() if _is_silu_gated_mlp(m)]
    return bool(mlps) and all(
        getattr(m.forward, "__func__", None) is _low_precision_gated_mlp_forward and _projections_are_frozen_low_precision(m)
        for m in mlps
    )


class LowPrecisionGatedMLP(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with frozen low-precision weights; x and the result in x's dtype.

    Forward is the arithmetic of the cast-wrapped linears: x cast to the weight dtype, the gate and up
    matmuls in it, silu(gate) * up in fp32, cast down for the down matmul, the result cast back.
    Backward uses the saved low-precision gate and up (exact: they are the matmuls' outputs).
    """

    @staticmethod
    def forward(ctx, x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias):
        low = gate_weight.dtype
        x_low = x.to(low)
        gate = F.linear(x_low, gate_weight, gate_bias)
        up = F.linear(x_low, up_weight, up_bias)
        product = F.silu(gate.float(), inplace=True).mul_(up).to(low)  # up is promoted to fp32 exactly
        ctx.save_for_backward(gate, up, gate_weight, up_weight, down_weight)
        ctx.input_dtype = x.dtype
        return F.linear(product, down_weight, down_bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        gate, up, gate_weight, up_weight, down_weight = ctx.saved_tensors
        low = gate_weight.dtype
        grad_product = (grad_output.to(low) @ down_weight).float()
        gate32 = gate.float()
        grad_up = F.silu(gate32).mul_(grad_product).to(low)  # ∂/∂up = silu(gate)
        # The op autograd runs for F.silu, so the gradient is the three-module path's, bit for bit.
        grad_gate = torch.ops.aten.silu_backward(grad_product.mul_(up), gate32).to(low)
        grad_x = (grad_gate @ gate_weight).to(ctx.input_dtype) + (grad_up @ up_weight).to(ctx.input_dtype)
        return grad_x, None, None, None, None, None, None


def upcast_frozen_linears(model: torch.nn.Module) -> None:
    """Give low-precision linears fp32 weights (their bf16 values, exactly), e.g. before merging an fp32 adapter."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype in LOW_PRECISION.values():
            module.to(torch.float32)


def base_weight_dtypes(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count per dtype name, e.g. {"bfloat16": 106M, "float32": 29M}: what a run reports."""
    counts: dict[str, int] = {}
    for parameter in model.parameters():
        name = str(parameter.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + parameter.numel()
    return counts
