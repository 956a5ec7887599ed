"""Packed attention (preftune/logprobs/attention.py): the key range of each block of queries, and the result against dense sdpa."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from preftune.data.collate import collate_pairs
from preftune.logprobs.attention import (
    PLAN_ARGUMENT,
    KeyRanges,
    PackedFlashAttentionCPU,
    blockwise_sdpa,
    flex_attention,
    flex_block_mask,
    packed_attention_plan,
    packed_sdpa_attention,
    query_block_key_ranges,
)
from tests.support import load_test_tokenizer, tokenized_hh_pairs


@pytest.fixture(scope="module")
def batch():
    """Twelve real hh-rlhf pairs packed into rows: several examples per row, shared prompts, padding."""
    tokenizer = load_test_tokenizer()
    return collate_pairs(tokenized_hh_pairs(tokenizer, read=12), pad_id=tokenizer.pad_token_id)


def test_each_block_sees_exactly_the_keys_between_its_first_and_last_visible_key(batch):
    mask = batch.attention_mask
    ranges = query_block_key_ranges(mask, block=16)
    length = mask.shape[-1]
    computed = 0
    for row in range(mask.shape[0]):
        for index, (start, end) in enumerate(zip(ranges.starts[row], ranges.ends[row])):
            block = mask[row, 0, index * 16 : (index + 1) * 16]
            visible = block.any(0).nonzero().flatten()
            assert (start, end) == (visible.min().item(), visible.max().item() + 1)
            assert not block[:, :start].any() and not block[:, end:].any()
            computed += block.shape[0] * (end - start)
    assert computed < 0.6 * mask.shape[0] * length * length  # the point: far less than the dense [length, length]


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from their module."""

    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def _cpu_flash_blocks(module, query, key, value, mask, ranges, scaling):
    return packed_sdpa_attention(module, query, key, value, mask, scaling=scaling, **{PLAN_ARGUMENT: ranges})[0]


def _sdpa_per_block(module, query, key, value, mask, ranges, scaling):
    return blockwise_sdpa(query, key, value, mask, ranges, scaling)  # the off-CPU path, here on CPU


@pytest.mark.parametrize("implementation", [_cpu_flash_blocks, _sdpa_per_block])
@pytest.mark.parametrize("block", [8, 16, 1000])
def test_packed_attention_and_its_gradients_equal_dense_masked_sdpa(batch, block, implementation):
    mask = batch.attention_mask
    rows, _, length, _ = mask.shape
    heads, kv_heads, dim = 4, 2, 8
    torch.manual_seed(0)
    inputs = [torch.randn(rows, n, length, dim, requires_grad=True) for n in (heads, kv_heads, kv_heads)]
    upstream = torch.randn(rows, length, heads, dim)
    module = _Attention(heads // kv_heads)

    packed = implementation(module, *inputs, mask, query_block_key_ranges(mask, block), dim**-0.5)
    (packed * upstream).sum().backward()
    packed_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    query, key, value = inputs
    dense = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask, scale=dim**-0.5
    ).transpose(1, 2)
    (dense * upstream).sum().backward()

    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(packed_grads, (t.grad for t in inputs)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # sums over up to ~200 keys


def test_cpu_blocks_backward_is_the_derivative_of_its_forward(batch):
    """gradcheck in float64 on a slice of real packed rows: blocks that share keys, a block that sees none."""
    mask = batch.attention_mask[:2, :, :24, :24].clone()
    mask[1, :, 16:] = False  # the last block of row 1 sees no key: zeros out, zero gradient
    ranges = query_block_key_ranges(mask, block=8)
    assert ranges.starts[1][-1] == ranges.ends[1][-1]
    torch.manual_seed(0)
    query = torch.randn(2, 2, 24, 4, dtype=torch.float64, requires_grad=True)
    key, value = (torch.randn(2, 1, 24, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    block_masks = ranges.block_masks(mask, torch.float64)

    def attend(q, k, v):
        return PackedFlashAttentionCPU.apply(q, k, v, block_masks, ranges, None)

    assert torch.autograd.gradcheck(attend, (query, key, value))
    assert attend(query, key, value)[1, 16:].abs().max() == 0


def test_each_block_mask_is_built_once_per_batch_for_all_layers(batch):
    mask = batch.attention_mask
    ranges = query_block_key_ranges(mask, block=16)
    block_masks = ranges.block_masks(mask, torch.float32)
    assert ranges.block_masks(mask, torch.float32) is block_masks
    blocks = list(ranges.blocks(mask.shape[-1]))
    assert len(blocks) == len(block_masks)
    for (row, queries, keys), additive in zip(blocks, block_masks):
        visible = mask[row : row + 1, :, queries, keys]
        assert torch.equal(additive == 0, visible) and torch.isneginf(additive[~visible]).all()
    assert ranges.block_masks(mask, torch.bfloat16)[0].dtype == torch.bfloat16


def _dense_reference(query, key, value, mask, scaling):
    groups = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask, scale=scaling
    ).transpose(1, 2)


needs_flex = pytest.mark.skipif(flex_attention is None, reason="this torch has no FlexAttention (torch >= 2.5)")


@needs_flex
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_flex_block_mask_path_computes_dense_masked_attention_in_rows_and_in_one_row(batch):
    """CUDA's path (its block mask, grouped heads and layout) through FlexAttention's eager reference, in forward
    only: FlexAttention has no backward on CPU. Rows with padding, then the one-row layout."""
    heads, kv_heads, dim = 4, 2, 16
    module = _Attention(heads // kv_heads)
    for mask in (batch.attention_mask, batch.in_one_row().attention_mask):
        rows, _, length, _ = mask.shape
        torch.manual_seed(length)
        query, key, value = (torch.randn(rows, n, length, dim) for n in (heads, kv_heads, kv_heads))
        block_mask = flex_block_mask(mask)
        assert block_mask.shape == (rows, 1, length, length)
        with torch.no_grad():
            flex = packed_sdpa_attention(module, query, key, value, mask, scaling=dim**-0.5, **{PLAN_ARGUMENT: block_mask})[0]
        torch.testing.assert_close(flex, _dense_reference(query, key, value, mask, dim**-0.5), rtol=1e-5, atol=1e-5)


@needs_flex
def test_the_plan_is_a_flex_block_mask_on_cuda_and_the_query_blocks_key_ranges_elsewhere(batch):
    plan = packed_attention_plan(batch.attention_mask)
    assert isinstance(plan, KeyRanges) and plan == query_block_key_ranges(batch.attention_mask)
    if torch.cuda.is_available():
        cuda_plan = packed_attention_plan(batch.attention_mask.cuda())
        assert not isinstance(cuda_plan, KeyRanges) and cuda_plan.shape[-1] == batch.attention_mask.shape[-1]


@needs_flex
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
def test_flex_attention_gradients_equal_dense_masked_sdpa_on_cuda(batch):
    mask = batch.in_one_row().attention_mask.cuda()
    rows, _, length, _ = mask.shape
    heads, kv_heads, dim = 4, 2, 16
    torch.manual_seed(0)
    inputs = [torch.randn(rows, n, length, dim, device="cuda", requires_grad=True) for n in (heads, kv_heads, kv_heads)]
    upstream = torch.randn(rows, length, heads, dim, device="cuda")
    plan = packed_attention_plan(mask)
    flex = packed_sdpa_attention(_Attention(2), *inputs, mask, scaling=dim**-0.5, **{PLAN_ARGUMENT: plan})[0]
    (flex * upstream).sum().backward()
    flex_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    dense = _dense_reference(*inputs, mask, dim**-0.5)
    (dense * upstream).sum().backward()
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(flex_grads, (t.grad for t in inputs)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
