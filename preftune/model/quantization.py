"""4-bit base weights (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) through bitsandbytes.

`model.load_in_4bit: true` replaces every linear layer of the decoder with bitsandbytes'
`Linear4bit` holding NF4 weights with double quantisation (`quantize_frozen_linears`), so the
frozen base takes about half a byte per weight: an 8B-class Llama's decoder linears take ~3.6 GB,
where bf16 takes 14 GB. Each matmul dequantises its weight to the compute dtype (`model.dtype`:
bf16 where the hardware has native bf16 matmuls, else fp32) and runs there. The LM head and the
embeddings stay fp32, as do the LoRA adapters, their optimiser state and every loss reduction
(preftune/model/precision.py explains why); the reference is the same 4-bit base with the
adapter disabled.

The layers are quantised one at a time from the checkpoint's memory mapping, straight onto the
training device, and each layer's pages of the file are dropped once it is quantised
(preftune/model/mapped_pages.py): loading peaks at the 4-bit model plus one layer. Quantising
while transformers loads (`BitsAndBytesConfig`) kept every page of the file it read: 7.8 GB of
RSS after loading SmolLM2-1.7B's shape on CPU, against 1.4 GB once those pages are dropped.

bitsandbytes is an optional dependency (`pip install bitsandbytes`); nothing imports it unless
a run asks for 4-bit weights.
"""

from __future__ import annotations

import importlib.util

import torch

from preftune.errors import ModelError
from preftune.model.mapped_pages import checkpoint_mappings, drop_mapped_pages, trim_heap

QUANT_TYPE = "nf4"  # QLoRA's 4-bit NormalFloat: quantiles of a normal distribution, as pretrained weights are


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "model.load_in_4bit: true needs the bitsandbytes package (pip install bitsandbytes), which is not installed"
        )


def quantize_frozen_linears(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
    """Replace each `nn.Linear` of the decoder with a frozen NF4 `Linear4bit` on `device`; returns how many.

    Call before `apply_lora`: peft then wraps the 4-bit layers (it reads `is_loaded_in_4bit`) with
    fp32 adapters. The layers stay in bitsandbytes' trainable layout on CPU too (see
    `keep_four_bit_trainable_on_cpu`).
    """
    require_bitsandbytes()
    import bitsandbytes

    mapped = checkpoint_mappings()
    decoder = model.get_decoder()
    targets = [
        (parent, name, child) for parent in decoder.modules() for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    for parent, name, linear in targets:
        quantized = bitsandbytes.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=True,  # double quantisation: the per-block scales quantised too, ~0.4 bits per weight saved
            quant_type=QUANT_TYPE, device="meta",
        )
        original = linear.weight.data
        quantized.weight = bitsandbytes.nn.Params4bit(
            original, requires_grad=False, compress_statistics=True, quant_type=QUANT_TYPE, module=quantized,
        ).to(device)  # quantises
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data.to(device, torch.float32), requires_grad=False)
        setattr(parent, name, quantized)
        drop_mapped_pages(original, mapped)
        trim_heap()  # the quantisation's temporaries, before the next layer's pile on top
    keep_four_bit_trainable_on_cpu(model)
    model.is_loaded_in_4bit = True
    return len(targets)


def four_bit_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The bitsandbytes 4-bit linear layers of `model` (empty when it has none, or bitsandbytes is not installed)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    import bitsandbytes

    return [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]


def is_four_bit(model: torch.nn.Module) -> bool:
    return bool(four_bit_linears(model))


def keep_four_bit_trainable_on_cpu(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns the layers changed.

    On a CPU with avx512_bf16, bitsandbytes 0.50 converts a `Linear4bit`'s weight to an inference
    layout on its first eval-mode forward without gradients, and from then on runs the layer
    through a kernel with no autograd formula, in training too. The reference forward is exactly
    such a forward, so every later backward would silently stop at the base layers and the LoRA
    weights would get no gradient (tests/test_quantization.py holds them to a dequantised copy's). Kept in the training
    layout, the layer dequantises and runs a matmul with its autograd formula, in every mode.
    """
    layers = four_bit_linears(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def cast_unquantized(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter and buffer outside the 4-bit layers to `dtype` (their packed bytes must stay as they are)."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            continue
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)


def dequantize_into_fp32(model: torch.nn.Module) -> None:
    """Replace every 4-bit linear of `model` with a frozen fp32 `nn.Linear` holding its dequantised weight, in place."""
    import bitsandbytes

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bitsandbytes.nn.Linear4bit):
                weight = bitsandbytes.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.float(), requires_grad=False)
                setattr(parent, name, linear)
    model.is_loaded_in_4bit = False
