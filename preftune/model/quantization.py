"""4-bit base weights (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) through bitsandbytes.

`model.load_in_4bit: true` loads every linear layer of the decoder as NF4 with double
quantisation (bitsandbytes' `Linear4bit`, quantised by transformers while the checkpoint loads),
so the frozen base takes about half a byte per weight: an 8B-class Llama's decoder fits in
~4.5 GB of GPU memory, where bf16 takes 16 GB. Each matmul dequantises its weight to the compute
dtype (`model.dtype`: bf16 where the hardware has native bf16 matmuls, else fp32) and runs there.
The LM head and the embeddings stay fp32, as do the LoRA adapters, their optimiser state and
every loss reduction (preftune/model/precision.py explains why); the reference is the same
4-bit base with the adapter disabled.

bitsandbytes is an optional dependency (`pip install bitsandbytes`); nothing imports it unless
a run asks for 4-bit weights.
"""

from __future__ import annotations

import importlib.util

import torch

from preftune.errors import ModelError

QUANT_TYPE = "nf4"  # QLoRA's 4-bit NormalFloat: quantiles of a normal distribution, as pretrained weights are


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "model.load_in_4bit: true needs the bitsandbytes package (pip install bitsandbytes), which is not installed"
        )


def four_bit_config(compute_dtype: torch.dtype):
    """transformers' quantisation config for NF4 decoder linears computing in `compute_dtype`; the LM head stays fp32."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_use_double_quant=True,  # the per-block scales quantised too: ~0.4 bits per weight saved
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["lm_head"],
    )


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
    weights would get no gradient (tests/test_quantization.py shows it). Kept in the training
    layout, the layer dequantises and runs a matmul with its autograd formula, in every mode.
    """
    layers = four_bit_linears(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def dequantize_into_fp32(model: torch.nn.Module) -> None:
    """Replace every 4-bit linear of the transformers model `model` with an fp32 `nn.Linear` holding its dequantised
    weight (transformers' `dequantize`), in place; the model then saves as a plain checkpoint."""
    model.dequantize(dtype=torch.float32)
