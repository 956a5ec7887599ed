"""Model FLOPs of a DPO step with a LoRA policy, and a matmul peak to divide them by (MFU).

Counting (a multiply-add is 2 FLOPs; the useful work of the job, not what padding or a dense
mask make the kernels do):

- decoder linears: 2 · P · T forward, P the decoder's linear parameters (q, k, v, o, gate, up,
  down over all layers), T the tokens processed (for packed rows: prompt once + answers, padding
  excluded; for TRL: prompt + answer per sequence, the prompt twice per pair);
- attention: 4 · h·e · layers per (query, key) pair a query may attend to (QKᵀ and PV), the pairs
  counted from the block mask (packed) or causally per sequence (TRL);
- LoRA: 2 · r · (in + out) per adapted module per token;
- LM head: 2 · d · V per scored position (preftune: answer tokens only; TRL: every position).

Backward with a frozen base and LoRA adapters needs the activation gradients of every layer but
no base-weight gradients: decoder linears 1× their forward (not the 2× of a full fine-tune),
attention 2× (dQ, dK, dV and dP are four matmuls to the forward's two), LoRA 2× (input and
weight gradients), LM head 1× (hidden-state gradient only). Gradient checkpointing adds one more
decoder forward (linears, attention, LoRA) of the policy; a chunked head recomputed in backward
adds 1× head forward (preftune's head only when it trains: a frozen one forms its hidden-state
gradient in forward, which is the 1× of the backward). The reference adds one forward without LoRA when it runs in the step
(not when its log-probs come from the cache or were precomputed before training).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepWork:
    tokens: int
    attention_pairs: int
    head_positions: int

    def __add__(self, other: StepWork) -> StepWork:
        return StepWork(self.tokens + other.tokens, self.attention_pairs + other.attention_pairs, self.head_positions + other.head_positions)


def packed_work(batch, examples) -> StepWork:
    """Work of one preftune PackedBatch of `examples`: their tokens (prompt once + answers), mask pairs, answer targets.

    Padding positions attend only to themselves in the block mask; their pairs are taken off.
    """
    tokens = sum(len(e.prompt_ids) + sum(map(len, e.answer_ids)) for e in examples)
    pads = batch.input_ids.numel() - tokens
    return StepWork(tokens, int(batch.attention_mask.sum()) - pads, int(batch.target_ids.numel()))


def unshared_work(pairs) -> StepWork:
    """Work of the same pairs as separate prompt+answer sequences with full logits (TRL's layout, padding excluded)."""
    lengths = [len(p.prompt_ids) + len(answer) for p in pairs for answer in (p.chosen_ids, p.rejected_ids)]
    return StepWork(sum(lengths), sum(n * (n + 1) // 2 for n in lengths), sum(lengths))


def _shapes(config) -> tuple[int, int, int, int, int, int, int]:
    d, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    e = getattr(config, "head_dim", None) or d // heads
    return d, i, layers, heads, kv, e, config.vocab_size


def decoder_linear_parameters(config) -> int:
    d, i, layers, heads, kv, e, _ = _shapes(config)
    return layers * (d * heads * e + 2 * d * kv * e + heads * e * d + 3 * d * i)


def lora_parameters(config, *, rank: int, targets: tuple[str, ...]) -> int:
    d, i, layers, heads, kv, e, _ = _shapes(config)
    sizes = {"q_proj": (d, heads * e), "k_proj": (d, kv * e), "v_proj": (d, kv * e), "o_proj": (heads * e, d),
             "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    return layers * sum(rank * (sizes[t][0] + sizes[t][1]) for t in targets)


def step_flops(
    config, work: StepWork, *, lora_rank: int, lora_targets: tuple[str, ...], checkpointing: bool,
    reference_in_step: bool, head_recomputed: bool,
) -> dict[str, float]:
    """FLOPs of one LoRA DPO step by part (see the module docstring) and their total."""
    d, _i, layers, heads, _kv, e, vocab = _shapes(config)
    linear = 2.0 * decoder_linear_parameters(config) * work.tokens
    attention = 4.0 * heads * e * layers * work.attention_pairs
    lora = 2.0 * lora_parameters(config, rank=lora_rank, targets=lora_targets) * work.tokens
    head = 2.0 * d * vocab * work.head_positions
    parts = {
        "policy_forward": linear + attention + lora + head,
        "policy_backward": linear + 2 * attention + 2 * lora + head + (head if head_recomputed else 0.0),
        "recomputation": (linear + attention + lora) if checkpointing else 0.0,
        "reference_forward": (linear + attention + head) if reference_in_step else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def matmul_peak(
    dtype: torch.dtype, *, device: str = "cpu", m: int = 2048, k: int = 576, n: int = 1536, seconds: float = 2.0
) -> float:
    """FLOP/s of a [m, k] @ [k, n] matmul in `dtype` on `device` (best of repeated timed batches)."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    synchronize()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        synchronize()
        best = max(best, 10 * 2.0 * m * k * n / (time.perf_counter() - started))
    return best
