"""torch.compile of the decoder forward on the benchmark's DPO job: compile time and step time vs eager.

    python benchmarks/bench_compile.py [--steps 4] [--dtype auto]

Two trainers of the same config; in one, the decoder's forward (what the log-prob engine calls,
with the packed rows' boolean block mask) is wrapped in `torch.compile(dynamic=True)`, since the
packed row length changes from batch to batch. Steps alternate between the two trainers so other
load hits both alike. Step 1 of the compiled trainer includes compilation; later steps with new
shapes show whether it recompiles.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_precision import config  # noqa: E402
from preftune.run import build_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    print(json.dumps({"load_before": os.getloadavg(), "torch": torch.__version__}), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as workdir:
        trainers = {
            name: build_trainer(config(Path(workdir) / name, args.dtype, gradient_checkpointing=False, batch_size=8,
                                       max_length=512, steps=args.steps))
            for name in ("eager", "compiled")
        }
        decoder = trainers["compiled"].policy.get_base_model().get_decoder()
        decoder.forward = torch.compile(decoder.forward, dynamic=True)
        seconds: dict[str, list[float]] = {name: [] for name in trainers}
        losses: dict[str, list[float]] = {name: [] for name in trainers}
        for step in range(args.steps):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                metrics = trainer.optimizer_step(trainer.step_micro_batches(0, step))
                seconds[name].append(time.perf_counter() - started)
                losses[name].append(metrics["loss"])
                print(json.dumps({"step": step, "run": name, "seconds": seconds[name][-1], "loss": metrics["loss"]}), flush=True)
        result = {
            name: {"step_seconds": s, "median_after_first": statistics.median(s[1:]), "losses": losses[name]}
            for name, s in seconds.items()
        }
        result["compile_overhead_first_step_s"] = seconds["compiled"][0] - seconds["eager"][0]
        result["load_after"] = os.getloadavg()
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
