"""Attention over packed rows that skips the keys a block of queries cannot see.

The collator's block mask (preftune/data/collate.py) is sparse: a row holds several examples,
each answer sees only its prompt and itself, and attention is causal. On SmolLM2's hh-rlhf
batches only 21-29% of a row's [length, length] mask is True, and a dense kernel with a mask
computes all of it. Here each row is cut into blocks of `QUERY_BLOCK` queries; a block attends
only to the contiguous key range from the first key any of its queries may see to the last
(`query_block_key_ranges`), through `scaled_dot_product_attention` with the mask's matching
slice. The keys outside that range are all masked for the block, so the result is the dense
masked attention's, to float rounding; at SmolLM2's longest bench batch it computes 42% of the
dense work.

It is registered with transformers as the attention implementation `PACKED_SDPA` (with sdpa's
mask function), and is sdpa itself whenever a forward does not pass the ranges (generation, the
plain full-logits path, any model call outside the engine). On CPU, grouped-query attention
goes to the kernel as is (`enable_gqa`); transformers' sdpa path repeats k and v to every head
when a mask is given, because CUDA's kernels need that. The GPU path for packed rows is
FlashAttention's varlen kernels or FlexAttention's block masks (not built here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "preftune_packed_sdpa"
KEY_RANGES_ARGUMENT = "preftune_key_ranges"
QUERY_BLOCK = 128  # fastest of 64 / 128 / 256 on SmolLM2's hh-rlhf batches (benchmarks/bench_attention.py)


@dataclass(frozen=True)
class KeyRanges:
    """Per row, per block of `block` queries: the [start, end) of the keys the block may see (start == end: none)."""

    block: int
    starts: list[list[int]]
    ends: list[list[int]]


def query_block_key_ranges(mask: torch.Tensor, block: int = QUERY_BLOCK) -> KeyRanges:
    """The key range of each block of queries in a boolean mask [rows, 1, length, length] (True = may attend)."""
    rows, _, length, _ = mask.shape
    blocks = -(-length // block)
    padded = F.pad(mask[:, 0], (0, 0, 0, blocks * block - length))  # [rows, blocks·block, length]
    visible = padded.view(rows, blocks, block, length).any(2)  # [rows, blocks, length]: any query of the block sees the key
    any_key = visible.any(-1)
    first = visible.int().argmax(-1)
    last = length - visible.flip(-1).int().argmax(-1)
    starts = torch.where(any_key, first, 0).tolist()
    ends = torch.where(any_key, last, 0).tolist()
    return KeyRanges(block, starts, ends)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [rows, heads, length, dim], k/v [rows, kv heads, length, dim]."""
    ranges: KeyRanges | None = kwargs.pop(KEY_RANGES_ARGUMENT, None)
    usable = (
        ranges is not None and dropout == 0.0 and attention_mask is not None and attention_mask.dtype == torch.bool
        and query.shape[2] == key.shape[2] == attention_mask.shape[-1]
    )
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    gqa = {}
    if groups > 1:
        if query.device.type == "cpu":
            gqa = {"enable_gqa": True}
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    length, block = query.shape[2], ranges.block
    rows = []
    for row, (starts, ends) in enumerate(zip(ranges.starts, ranges.ends)):
        pieces = []
        for index, (start, end) in enumerate(zip(starts, ends)):
            q_start, q_end = index * block, min((index + 1) * block, length)
            queries = query[row : row + 1, :, q_start:q_end]
            if start == end:  # queries that see nothing (padding): zeros, as no key contributes
                pieces.append(torch.zeros_like(queries[..., : value.shape[-1]]))
                continue
            pieces.append(
                F.scaled_dot_product_attention(
                    queries, key[row : row + 1, :, start:end], value[row : row + 1, :, start:end],
                    attn_mask=attention_mask[row : row + 1, :, q_start:q_end, start:end], scale=scaling, **gqa,
                )
            )
        rows.append(torch.cat(pieces, dim=2))
    output = torch.cat(rows, dim=0)  # [rows, heads, length, dim]
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
