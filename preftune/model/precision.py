"""Where the frozen base weights live in bf16: `model.dtype` resolved, and the decoder's linear layers stored low.

With LoRA the base weights never change, so they need no fp32 master copy: storing the decoder's
linear layers (attention and MLP projections) in bfloat16 halves their memory and runs their
matmuls on the CPU's bf16 units (`avx512_bf16`, AMX) or the GPU's tensor cores. Everything else
stays fp32: the residual stream, the norms, attention's softmax, the embeddings and the LM head
(so answer log-probs come from fp32 logits), the LoRA weights (peft keeps adapters fp32), their
gradients, the optimiser state and every loss reduction. A low-precision linear casts its input
to the weight dtype and its output back to the input's dtype, so x @ A of the adapter next to it
runs in fp32 on the fp32 activations.

A full fine-tune (`model.lora: null`) trains the base itself, and bf16 weights under an fp32
AdamW lose every update smaller than a bf16 ulp: it stays fp32 (see `resolve_base_dtype`).
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError

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
    """
    if dtype == "float32":
        return 0
    low = LOW_PRECISION[dtype]
    decoder = model.get_decoder()
    converted = 0
    for module in decoder.modules():
        if type(module) is torch.nn.Linear:
            module.requires_grad_(False)
            module.to(low)
            module.forward = types.MethodType(_low_precision_linear_forward, module)
            converted += 1
    return converted


def _low_precision_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # The matmul (forward, and the activation gradient in backward) runs in the weight dtype; the
    # activations around it stay in theirs, so norms, residuals and adapters see fp32.
    return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


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
