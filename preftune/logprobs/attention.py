"""Attention over packed rows that skips the keys a block of queries cannot see.

The collator's block mask (preftune/data/collate.py) is sparse: a row holds several examples,
each answer sees only its prompt and itself, and attention is causal. On SmolLM2's hh-rlhf
batches only 21-29% of a row's [length, length] mask is True, and a dense kernel with a mask
computes all of it. Here each row is cut into blocks of `QUERY_BLOCK` queries; a block attends
only to the contiguous key range from the first key any of its queries may see to the last
(`query_block_key_ranges`), with the mask's matching slice. The keys outside that range are all
masked for the block, so the result is the dense masked attention's, to float rounding; at
SmolLM2's longest bench batch it computes 32% of the dense work. Because the cost follows what
the blocks see, not the row's length, the engine runs a whole batch as one row without padding
(preftune/logprobs/engine.py, `engine_layout`).

On CPU the blocks run as one autograd function, `PackedFlashAttentionCPU`, around PyTorch's CPU
flash-attention kernels (the private aten ops behind `scaled_dot_product_attention`; the tests
hold the result and its gradients to the public dense path): forward writes each block's output
and log-sum-exp into one buffer, backward calls the kernel's backward per block and adds each
block's key and value gradients into one buffer. Autograd through one sdpa call per block would
instead give every block its own node, whose backward materialises full-size zero gradients for
the query, key and value it sliced. Each block's slice of the boolean mask becomes the kernel's
additive mask once per batch, not once per layer and block. Grouped-query attention goes to the
kernel as is; transformers' sdpa path repeats k and v to every head when a mask is given,
because CUDA's kernels need that.

On CUDA the mask becomes a FlexAttention `BlockMask` once per batch (`flex_block_mask`), and each
layer runs `flex_attention` compiled once with dynamic shapes (`flex_packed_attention`): its
kernels skip the mask's empty tiles and apply the rest inside the kernel, forward and backward,
with grouped-query attention as is. Where FlexAttention is missing (torch < 2.5) or off CUDA and
CPU (MPS), each block is one `scaled_dot_product_attention` call with k and v repeated
(`blockwise_sdpa`). FlexAttention has no backward on CPU, so on CPU it is tested in forward only.

What every layer of one batch shares is built once by `packed_attention_plan`: the key ranges of
each query block (CPU and the fallback), or the block mask (CUDA). It is registered with
transformers as the attention implementation `PACKED_SDPA` (with sdpa's mask function), and is
sdpa itself whenever a forward does not pass a plan (generation, the plain full-logits path, any
model call outside the engine).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = flex_attention = create_block_mask = None

PACKED_SDPA = "preftune_packed_sdpa"
PLAN_ARGUMENT = "preftune_packed_attention_plan"
QUERY_BLOCK = 64  # fastest of 32 / 64 / 128 on every SmolLM2 hh-rlhf bench batch (benchmarks/results.md, 21:54 run)

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class KeyRanges:
    """Per row, per block of `block` queries: the [start, end) of the keys the block may see (start == end: none).

    One per batch, shared by every layer, which also share each block's additive mask (`block_masks`).
    """

    block: int
    starts: list[list[int]]
    ends: list[list[int]]
    _block_masks: dict[torch.dtype, list[torch.Tensor]] = field(default_factory=dict, compare=False, repr=False)

    def blocks(self, length: int) -> Iterator[tuple[int, slice, slice]]:
        """(row, query slice, key slice) of every block that sees at least one key."""
        for row, (starts, ends) in enumerate(zip(self.starts, self.ends)):
            for index, (start, end) in enumerate(zip(starts, ends)):
                if start < end:
                    yield row, slice(index * self.block, min((index + 1) * self.block, length)), slice(start, end)

    def block_masks(self, mask: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each block's slice of the boolean `mask` these ranges were made from, as 0 / −inf in `dtype` (built once).

        [1, 1, block queries, block keys] each, in `blocks` order: together about tokens × the keys a
        block sees, not the row's length squared.
        """
        if dtype not in self._block_masks:
            self._block_masks[dtype] = [
                torch.zeros((1, 1, queries.stop - queries.start, keys.stop - keys.start), dtype=dtype, device=mask.device)
                .masked_fill_(~mask[row : row + 1, :, queries, keys], float("-inf"))
                for row, queries, keys in self.blocks(mask.shape[-1])
            ]
        return self._block_masks[dtype]


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


class PackedFlashAttentionCPU(torch.autograd.Function):
    """Blockwise masked attention on CPU: q [rows, heads, length, dim], k/v [rows, kv heads, length, dim] in,
    [rows, length, heads, dim] out (transformers' layout). Queries of blocks that see no key get zeros."""

    @staticmethod
    def forward(ctx, query, key, value, block_masks: list[torch.Tensor], ranges: KeyRanges, scale: float | None):
        rows, heads, length, _ = query.shape
        output = query.new_zeros(rows, length, heads, value.shape[-1])
        logsumexp = query.new_zeros(rows, heads, length, dtype=torch.promote_types(query.dtype, torch.float32))
        for (row, queries, keys), block_mask in zip(ranges.blocks(length), block_masks):
            block_output, block_logsumexp = _flash_forward(
                query[row : row + 1, :, queries], key[row : row + 1, :, keys], value[row : row + 1, :, keys],
                0.0, False, attn_mask=block_mask, scale=scale,
            )
            output[row : row + 1, queries] = block_output.transpose(1, 2)
            logsumexp[row : row + 1, :, queries] = block_logsumexp
        ctx.save_for_backward(query, key, value, output, logsumexp)
        ctx.block_masks, ctx.ranges, ctx.scale = block_masks, ranges, scale  # constants: no gradient, shared by every layer
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, logsumexp = ctx.saved_tensors
        grad_query, grad_key, grad_value = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for (row, queries, keys), block_mask in zip(ctx.ranges.blocks(query.shape[2]), ctx.block_masks):
            block_grad_query, block_grad_key, block_grad_value = _flash_backward(
                grad_output[row : row + 1, queries].transpose(1, 2),
                query[row : row + 1, :, queries], key[row : row + 1, :, keys], value[row : row + 1, :, keys],
                output[row : row + 1, queries].transpose(1, 2), logsumexp[row : row + 1, :, queries],
                0.0, False, attn_mask=block_mask, scale=ctx.scale,
            )
            grad_query[row : row + 1, :, queries] = block_grad_query
            grad_key[row : row + 1, :, keys] += block_grad_key
            grad_value[row : row + 1, :, keys] += block_grad_value
        return grad_query, grad_key, grad_value, None, None, None


def packed_attention_plan(mask: torch.Tensor) -> KeyRanges | BlockMask:
    """What every layer's packed attention over the boolean `mask` [rows, 1, length, length] shares, built once per batch."""
    if mask.device.type == "cuda" and flex_attention is not None:
        return flex_block_mask(mask)
    return query_block_key_ranges(mask)


def flex_block_mask(mask: torch.Tensor) -> BlockMask:
    """The boolean `mask` [rows, 1, length, length] (True = may attend) as a FlexAttention block mask."""
    rows, _, length, _ = mask.shape
    may_attend = mask[:, 0]

    def mask_mod(row, head, query, key):
        return may_attend[row, query, key]

    return create_block_mask(mask_mod, rows, None, length, length, device=mask.device)


@functools.cache
def _compiled_flex_attention():
    # Compiled once for every length: a batch's length varies, and a recompile per shape would hit dynamo's limit.
    return torch.compile(flex_attention, dynamic=True)


def flex_packed_attention(query, key, value, block_mask: BlockMask, scaling: float | None) -> torch.Tensor:
    """q [rows, heads, length, dim], k/v [rows, kv heads, length, dim] → [rows, length, heads, dim] (transformers' layout).

    Compiled on CUDA. Elsewhere FlexAttention's eager reference runs (a forward-only check on CPU:
    inductor's CPU code for flex attention with dynamic shapes does not compile in torch 2.13).
    """
    attend = _compiled_flex_attention() if query.device.type == "cuda" else flex_attention
    grouped = query.shape[1] != key.shape[1]
    output = attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=grouped)
    return output.transpose(1, 2).contiguous()


def runs_packed_cpu_attention(model: torch.nn.Module, device: torch.device | str) -> bool:
    """True when the engine's forwards of `model` (the plain causal LM) on `device` run `PackedFlashAttentionCPU`."""
    return torch.device(device).type == "cpu" and getattr(model.config, "_attn_implementation", None) == PACKED_SDPA


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
    plan: KeyRanges | BlockMask | None = kwargs.pop(PLAN_ARGUMENT, None)
    usable = (
        plan is not None and dropout == 0.0 and attention_mask is not None and attention_mask.dtype == torch.bool
        and query.shape[2] == key.shape[2] == attention_mask.shape[-1]
    )
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if not isinstance(plan, KeyRanges):
        return flex_packed_attention(query, key, value, plan, scaling), None
    ranges = plan
    if query.device.type == "cpu":
        block_masks = ranges.block_masks(attention_mask, query.dtype)
        return PackedFlashAttentionCPU.apply(query, key, value, block_masks, ranges, scaling), None
    return blockwise_sdpa(query, key, value, attention_mask, ranges, scaling), None


def blockwise_sdpa(query, key, value, attention_mask, ranges: KeyRanges, scaling: float | None) -> torch.Tensor:
    """The same blocks as one `scaled_dot_product_attention` call each (any device), k and v repeated to every head."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    length, block = query.shape[2], ranges.block
    rows = []
    for row, (starts, ends) in enumerate(zip(ranges.starts, ranges.ends)):
        pieces = []
        for index, (start, end) in enumerate(zip(starts, ends)):
            queries = query[row : row + 1, :, index * block : min((index + 1) * block, length)]
            if start == end:  # queries that see nothing (padding): zeros, as no key contributes
                pieces.append(torch.zeros_like(queries[..., : value.shape[-1]]))
                continue
            pieces.append(F.scaled_dot_product_attention(
                queries, key[row : row + 1, :, start:end], value[row : row + 1, :, start:end],
                attn_mask=attention_mask[row : row + 1, :, index * block : index * block + queries.shape[2], start:end],
                scale=scaling,
            ))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()  # [rows, length, heads, dim]


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
