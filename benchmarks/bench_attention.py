"""Packed attention vs dense masked sdpa on the DPO benchmark's real batches: one layer, forward + backward.

    python benchmarks/bench_attention.py [--steps 4] [--repeats 5]

The batches are the first `--steps` of `bench_dpo_vs_trl.py`'s job (hh-rlhf, batch 8, max length
512, packed and prompt-shared by preftune's collator); q/k/v are random with SmolLM2-135M's
attention shape (9 query heads, 3 kv heads, head dim 64). Per batch: the median over `--repeats`
of one forward + backward of

  dense-repeat   transformers' sdpa path with a mask: k and v repeated to every head, dense mask
  dense-gqa      the same with `enable_gqa` (k and v unrepeated)
  per-block-B    the same blocks as one autograd sdpa call each (`blockwise_sdpa`, the off-CPU path)
  packed-B       preftune's attention on CPU (`PackedFlashAttentionCPU`) with query blocks of B
  one-row-64     the same on the batch as the engine runs it: one row, the padding dropped
                 (`PackedBatch.in_one_row`), blocks of 64

and the fraction of the dense [length, length] work each block size computes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_dpo_vs_trl import preftune_config  # noqa: E402
from preftune.logprobs.attention import PLAN_ARGUMENT, blockwise_sdpa, packed_sdpa_attention, query_block_key_ranges  # noqa: E402
from preftune.run import build_trainer  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
BLOCKS = (32, 64, 128)


class _Attention(torch.nn.Module):
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def _seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run().sum().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps({"load_before": os.getloadavg()[0], "torch": torch.__version__}), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-attention-") as workdir:
        trainer = build_trainer(preftune_config(
            Path(workdir) / "run", batch_size=8, max_length=512, steps=args.steps, cache_dir=Path(workdir) / "cache",
            reference_cache=False,
        ))
        batches = [
            trainer.layout.collate([trainer.data.train[i] for i in trainer.step_micro_batches(0, step)[0]], pad_id=trainer.pad_id)
            for step in range(args.steps)
        ]
    del trainer
    torch.manual_seed(0)
    for step, batch in enumerate(batches):
        mask = batch.attention_mask
        rows, _, length, _ = mask.shape
        query = torch.randn(rows, HEADS, length, HEAD_DIM, requires_grad=True)
        key, value = (torch.randn(rows, KV_HEADS, length, HEAD_DIM, requires_grad=True) for _ in range(2))
        groups = HEADS // KV_HEADS
        row = {"step": step, "rows": rows, "length": length, "mask_density": round(mask.float().mean().item(), 3)}
        row["dense-repeat"] = _seconds(lambda: F.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask), args.repeats)
        row["dense-gqa"] = _seconds(
            lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True), args.repeats)
        for block in BLOCKS:
            ranges = query_block_key_ranges(mask, block)
            computed = sum(
                (min((i + 1) * block, length) - i * block) * (end - start)
                for starts, ends in zip(ranges.starts, ranges.ends) for i, (start, end) in enumerate(zip(starts, ends))
            )
            row[f"work-{block}"] = round(computed / (rows * length * length), 3)
            row[f"per-block-{block}"] = _seconds(
                lambda: blockwise_sdpa(query, key, value, mask, ranges, None), args.repeats)
            row[f"packed-{block}"] = _seconds(lambda: packed_sdpa_attention(
                _Attention(), query, key, value, mask, **{PLAN_ARGUMENT: ranges})[0], args.repeats)
        one_row = batch.in_one_row().attention_mask
        tokens = one_row.shape[-1]
        one_query = torch.randn(1, HEADS, tokens, HEAD_DIM, requires_grad=True)
        one_key, one_value = (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, requires_grad=True) for _ in range(2))
        one_ranges = query_block_key_ranges(one_row, 64)
        row["one-row-tokens"] = tokens
        row["one-row-64"] = _seconds(lambda: packed_sdpa_attention(
            _Attention(), one_query, one_key, one_value, one_row, **{PLAN_ARGUMENT: one_ranges})[0], args.repeats)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print(json.dumps({"load_after": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
