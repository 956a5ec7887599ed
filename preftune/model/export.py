"""Export the trained policy: the LoRA adapter, and a merged model any transformers user can load."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from preftune.atomic import atomic_directory
from preftune.model.lora import is_lora
from preftune.model.precision import upcast_frozen_linears
from preftune.model.quantization import dequantize_into_fp32, is_four_bit


def save_adapter(policy: torch.nn.Module, tokenizer, target: str | Path) -> Path:
    """The adapter (adapter_model.safetensors + adapter_config.json), or the full weights when not LoRA."""
    with atomic_directory(target) as staging:
        policy.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return Path(target)


def save_merged(policy: torch.nn.Module, tokenizer, target: str | Path) -> Path:
    """A plain model folder (model.safetensors) loadable with `AutoModelForCausalLM.from_pretrained`.

    LoRA weights are merged into a copy, so the live policy keeps its adapter. A bf16 base is
    upcast first, so the fp32 adapter delta is added in fp32 and not rounded away to bf16. A 4-bit
    base is dequantised into fp32 on the CPU first, for the same reason: peft's own merge would
    quantise the sum back to NF4, whose steps are far larger than the adapter's delta. The export
    is then the model the adapter was trained on, in fp32, loadable without bitsandbytes.
    """
    merged = policy
    if is_lora(policy) and is_four_bit(policy):
        merged = copy.deepcopy(policy).to("cpu")
        dequantize_into_fp32(merged.get_base_model())
        merged = _merge_adapters_into_base_layers(merged)
    elif is_lora(policy):
        merged = copy.deepcopy(policy)
        upcast_frozen_linears(merged)
        merged = merged.merge_and_unload()
    training_use_cache = merged.config.use_cache
    merged.config.use_cache = True  # the export is for generation
    try:
        with atomic_directory(target) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
    finally:
        merged.config.use_cache = training_use_cache
    return Path(target)


def _merge_adapters_into_base_layers(model):
    """Add each LoRA layer's delta to its (fp32, plain) base layer, then drop the adapters (peft's `unload`)."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    base.weight.data += module.get_delta_weight(adapter).to(base.weight.dtype)
    return model.unload()
