"""Long-run memory check: train the tiny model for thousands of steps (evaluation and checkpoints on),
sample the process's resident memory (RSS) every N steps, and fail if it keeps growing.

    python -m benchmarks.long_run_memory                     # 3000 steps, RSS every 50, from the repo root
    python -m benchmarks.long_run_memory --steps 300 --every 10

The verdict: a least-squares line through the samples of the second half (the first half holds
the warm-up: allocator arenas, the reference cache filling, lazy imports). Growth is the slope in
bytes per step; the run fails when slope × the second half's steps exceeds `--tolerance-mb`, i.e.
when the trend would add that much over the steps it was fitted on. A leak of one retained tensor
or metrics row per step shows up as a steady slope; noise of a few hundred KB does not.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from rich.console import Console

from preftune.control import Controller, StepContext
from preftune.run import build_trainer
from tests.support import save_tiny_model, tiny_run_config


class RssSampler(Controller):
    """Records (step, RSS bytes) every `every` optimiser steps."""

    name = "rss_sampler"

    def __init__(self, every: int):
        self.every = every
        self.process = psutil.Process()
        self.samples: list[tuple[int, int]] = []

    def on_step_end(self, context: StepContext) -> None:
        if context.step % self.every == 0:
            self.samples.append((context.step, self.process.memory_info().rss))


@dataclass
class MemoryResult:
    steps: int
    seconds: float
    rss_first_mb: float
    rss_last_mb: float
    rss_peak_mb: float
    slope_kb_per_step: float  # over the second half
    growth_mb: float  # slope × the second half's steps
    tolerance_mb: float
    passed: bool
    samples: list[tuple[int, int]]


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope b = Sxy / Sxx of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx


def measure(steps: int, *, every: int, tolerance_mb: float, workdir: Path) -> MemoryResult:
    model_dir = save_tiny_model(workdir / "model")
    config = tiny_run_config(
        workdir / "run", model_dir,
        training={
            "max_steps": steps, "eval_steps": max(steps // 20, 1), "save_steps": max(steps // 10, 1),
            "save_total_limit": 2, "logging_steps": 1, "report_to": ["jsonl", "tensorboard"],
            "reference_cache_dir": str(workdir / "cache"),
        },
    )
    quiet = Console(file=io.StringIO())
    trainer = build_trainer(config, console=quiet)
    sampler = RssSampler(every)
    trainer.controllers.append(sampler)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    samples = sampler.samples
    second_half = [(s, r) for s, r in samples if s > steps // 2]
    per_step = slope(second_half)
    span = second_half[-1][0] - second_half[0][0]
    growth_mb = per_step * span / 2**20
    return MemoryResult(
        steps=steps, seconds=round(seconds, 1),
        rss_first_mb=round(samples[0][1] / 2**20, 1), rss_last_mb=round(samples[-1][1] / 2**20, 1),
        rss_peak_mb=round(max(r for _, r in samples) / 2**20, 1),
        slope_kb_per_step=round(per_step / 1024, 3), growth_mb=round(growth_mb, 2), tolerance_mb=tolerance_mb,
        passed=growth_mb <= tolerance_mb, samples=samples,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=50, help="sample RSS every N steps")
    parser.add_argument("--tolerance-mb", type=float, default=20.0, help="allowed growth over the second half")
    parser.add_argument("--output", help="also write the result (with every sample) as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        result = measure(args.steps, every=args.every, tolerance_mb=args.tolerance_mb, workdir=Path(workdir))
    summary = {k: v for k, v in asdict(result).items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(asdict(result), indent=2))
    if not result.passed:
        print(f"FAIL: RSS grew {result.growth_mb} MB over the second half (> {result.tolerance_mb} MB)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
