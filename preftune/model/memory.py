"""How much memory the decoder's saved activations take, and whether gradient checkpointing is needed.

`gradient_checkpointing: auto` turns checkpointing on only when the activations autograd keeps for
backward in the largest micro-batch would not fit `training.memory_budget_gb` (default: half of
the available RAM, or of the free GPU memory).

The estimate (bytes; activations are fp32, 4 bytes, even with a bf16 base: the residual stream
stays fp32) counts what a Llama-style decoder layer (transformers' sdpa path) saves, per token of
the packed rows (T = rows × row length, pads included) and per layer, with d hidden size, i
intermediate size, h·e attention heads × head dim, r the LoRA rank and m the number of LoRA
target modules, in fp32 elements:

    per token:  3·d  (the two RMSNorms' inputs and normalised outputs)
              + 4·h·e (q and k after RoPE, k and v repeated to all h heads for GQA, the attention output)
                or 2·h·e + 2·g·e + h (preftune's packed attention on CPU, g kv heads: q, the
                     unrepeated k and v, the output and its per-head log-sum-exp;
                     preftune/logprobs/attention.py)
              + 3·i  (gate, up and SiLU(gate), kept for the gated product)
                or i (2·i bf16 elements: gate and up only, with a bf16 base whose MLP has no adapter;
                     preftune/model/precision.py, `LowPrecisionGatedMLP`)
              + r·m  (each adapter's x·A)                                     [LoRA]
              + 4·d + h·e + i  (the inputs of the trained o/down projections)  [full fine-tune]
    per row:    row length²  (the block mask as an additive float mask, one copy per layer;
                not with the packed attention, whose block masks are `shared`)

    outside     = T · (2·e + d) · 4   (RoPE cos/sin, the final norm's input; + T·d when the
                  embeddings are trained)
    shared      = T · (row length + b) · 4 with the packed attention (each block of b = 64 queries
                  keeps its mask slice, at most row length + b keys wide), else 0
    stored      = layers · (T · per token + rows · row length²) · 4 + outside + shared
                  (the per-layer masks only without the packed attention)
    checkpointed = layers · T · d · 4 + outside  (each layer's input)
                 + one layer's stored activations (recomputed in backward, one layer at a time) + shared

Measured against the saved tensors of real forwards (tests/test_memory.py) it agrees within
15%; what the LM head keeps (a [chunk, hidden] gradient per chunk with a frozen head, a
recomputed [chunk, vocab] slice with a trained one) and the transient gradients of backward are
not counted, so keep the budget below the physical memory.

The largest micro-batch is bounded without collating it: each example is one packed row at most
as long as the longest example (prompt + all its answers) of the training data, so
rows × row length ≤ batch size × longest example, for every micro-batch of every epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil
import torch

from preftune.logprobs.attention import QUERY_BLOCK

DEFAULT_BUDGET_FRACTION = 0.5
_GB = 1e9


@dataclass(frozen=True)
class ActivationEstimate:
    rows: int
    row_length: int
    layers: int
    stored_bytes: int  # without checkpointing
    attention_mask_bytes: int  # the packed attention's block masks, built once and kept by every layer (else 0)
    layer_input_bytes: int  # with checkpointing: what stays saved through the forward (each layer's input)
    checkpointed_bytes: int  # with checkpointing, peak: the layer inputs + one layer recomputed in backward


@dataclass(frozen=True)
class MemoryPlan:
    """The gradient-checkpointing decision and what it rests on; `as_record()` is what run.json keeps."""

    setting: bool | str  # the config value: True, False or "auto"
    gradient_checkpointing: bool
    estimate: ActivationEstimate
    budget_bytes: int | None  # None when the setting was not auto
    reason: str

    def as_record(self) -> dict:
        record = {
            "gradient_checkpointing": self.gradient_checkpointing,
            "setting": self.setting,
            "activation_gb_stored": round(self.estimate.stored_bytes / _GB, 3),
            "activation_gb_checkpointed": round(self.estimate.checkpointed_bytes / _GB, 3),
            "largest_micro_batch_bound": {"rows": self.estimate.rows, "row_length": self.estimate.row_length},
            "reason": self.reason,
        }
        if self.budget_bytes is not None:
            record["budget_gb"] = round(self.budget_bytes / _GB, 3)
        return record


def estimate_activation_bytes(
    config, *, rows: int, row_length: int, lora_rank: int | None, lora_targets: int = 0, low_precision_mlp: bool = False,
    packed_attention: bool = False,
) -> ActivationEstimate:
    """Saved-activation bytes of one micro-batch of `rows` packed rows of `row_length` (formula: module docstring).

    `config` is the model's transformers config; `lora_rank=None` means a full fine-tune;
    `low_precision_mlp`: the MLP runs as `LowPrecisionGatedMLP` (bf16 base, no adapter on the MLP);
    `packed_attention`: attention runs as preftune's packed attention on CPU (`PackedFlashAttentionCPU`).
    """
    bytes_per_element = 4
    d, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = heads * head_dim
    saved_by_attention = 2 * attention + 2 * kv_heads * head_dim + heads if packed_attention else 4 * attention
    per_token = 3 * d + saved_by_attention + (i if low_precision_mlp else 3 * i)
    per_token += lora_rank * lora_targets if lora_rank is not None else 4 * d + attention + i
    tokens = rows * row_length
    masks_per_layer = 0 if packed_attention else rows * row_length**2
    per_layer = (tokens * per_token + masks_per_layer) * bytes_per_element
    layers = config.num_hidden_layers
    # Outside the layers: RoPE's cos/sin tables and the final norm's input (plus the embeddings' output when trained).
    outside = tokens * (2 * head_dim + (d if lora_rank is not None else 2 * d)) * bytes_per_element
    shared_mask = tokens * (row_length + QUERY_BLOCK) * bytes_per_element if packed_attention else 0
    layer_inputs = layers * tokens * d * bytes_per_element + outside
    return ActivationEstimate(
        rows=rows, row_length=row_length, layers=layers, stored_bytes=layers * per_layer + outside + shared_mask,
        attention_mask_bytes=shared_mask,
        layer_input_bytes=layer_inputs, checkpointed_bytes=layer_inputs + per_layer + shared_mask,
    )


def default_memory_budget_bytes(device: torch.device | str = "cpu", fraction: float = DEFAULT_BUDGET_FRACTION) -> int:
    """`fraction` of the memory free now: the GPU's free memory on CUDA, the available RAM (psutil) otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(fraction * free)
    return int(fraction * psutil.virtual_memory().available)


def plan_gradient_checkpointing(
    setting: bool | str, estimate: ActivationEstimate, *, budget_bytes: int | None
) -> MemoryPlan:
    """True/False as configured; `auto`: on exactly when the stored activations exceed `budget_bytes`."""
    stored_gb = estimate.stored_bytes / _GB
    if setting != "auto":
        return MemoryPlan(setting, bool(setting), estimate, None, f"training.gradient_checkpointing: {str(setting).lower()}")
    if budget_bytes is None:
        raise ValueError("gradient_checkpointing: auto needs a memory budget")
    needed = estimate.stored_bytes > budget_bytes
    comparison = ">" if needed else "<="
    reason = (
        f"auto: stored activations of the largest micro-batch ≈ {stored_gb:.2f} GB {comparison} budget "
        f"{budget_bytes / _GB:.2f} GB, so checkpointing is {'on' if needed else 'off'}"
    )
    return MemoryPlan(setting, needed, estimate, budget_bytes, reason)
