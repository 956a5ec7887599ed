"""bf16 frozen base vs fp32 on the benchmark's DPO job: numerical agreement, then step time.

    python benchmarks/bench_precision.py [--steps 5] [--agreement-only | --speed-only]

Agreement: two trainers (model.dtype float32 / bfloat16, same LoRA init); the fp32 one takes one
optimiser step and its adapter is copied into the bf16 one, so both hold the same trained adapter.
On the next batch both compute reference and policy log-probs, the DPO loss and the LoRA
gradients; reported are the largest absolute / relative log-prob differences, the loss
difference, and the gradients' relative error ‖g16 − g32‖ / ‖g32‖ and cosine.

Speed: for each dtype (and gradient checkpointing on / off), `--steps` optimiser steps with the
reference computed every step (no cache); the medians over steps 2.. of wall time and of CPU
time (all threads; the fair measure when other work shares the cores) are reported, with the
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from preftune.config import validate_config  # noqa: E402
from preftune.model.precision import bf16_matmul_supported, cpu_flags  # noqa: E402
from preftune.run import build_trainer  # noqa: E402


def config(output_dir: Path, dtype: str, *, gradient_checkpointing: bool, batch_size: int, max_length: int, steps: int):
    return validate_config({
        "output_dir": str(output_dir),
        "model": {"name_or_path": "smollm2-135m", "dtype": dtype,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train_file": "hh-rlhf-harmless:train", "max_validation_samples": 1, "max_length": max_length},
        "method": {"loss_type": "sigmoid", "beta": 0.1},
        "training": {"learning_rate": 5e-5, "per_device_train_batch_size": batch_size, "max_steps": steps, "seed": 42,
                     "eval_steps": None, "report_to": ["jsonl"], "reference_cache": False,
                     "gradient_checkpointing": gradient_checkpointing},
    })


def _lora_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainer.policy.named_parameters() if p.requires_grad}


def agreement(workdir: Path, *, batch_size: int, max_length: int) -> dict:
    trainers = {d: build_trainer(config(workdir / d, d, gradient_checkpointing=False, batch_size=batch_size,
                                        max_length=max_length, steps=2)) for d in ("float32", "bfloat16")}
    fp32, bf16 = trainers["float32"], trainers["bfloat16"]
    fp32.optimizer_step(fp32.step_micro_batches(0, 0))
    with torch.no_grad():
        for name, parameter in _lora_state(bf16).items():
            parameter.copy_(_lora_state(fp32)[name])
    examples = [fp32.data.train[i] for i in fp32.step_micro_batches(0, 1)[0]]
    out = {}
    for dtype, trainer in trainers.items():
        trainer.optimizer.zero_grad(set_to_none=True)
        batch = trainer.layout.collate(examples, pad_id=trainer.pad_id)
        reference = trainer.reference_logps(batch).sum
        policy = trainer.policy_logps(batch)
        loss = trainer.loss(trainer.layout.split(policy, examples), trainer.layout.split(trainer.reference_logps(batch), examples)).losses
        loss.mean().backward()
        out[dtype] = {"reference": reference.detach(), "policy": policy.sum.detach(), "loss": loss.detach(),
                      "grad": torch.cat([p.grad.reshape(-1) for p in trainer.trainable])}
    a, b = out["float32"], out["bfloat16"]
    result = {}
    for key in ("reference", "policy"):
        difference = (b[key] - a[key]).abs()
        result[f"{key}_logp_max_abs"] = difference.max().item()
        result[f"{key}_logp_max_rel"] = (difference / a[key].abs()).max().item()
        result[f"{key}_logp_mean_abs_fp32"] = a[key].abs().mean().item()
    margin = lambda o: (o["policy"] - o["reference"])  # noqa: E731 the per-sequence log-ratio the loss sees
    result["log_ratio_max_abs"] = (margin(b) - margin(a)).abs().max().item()
    result["loss_fp32"], result["loss_bf16"] = a["loss"].mean().item(), b["loss"].mean().item()
    result["loss_max_abs_per_pair"] = (b["loss"] - a["loss"]).abs().max().item()
    result["grad_rel_error"] = ((b["grad"] - a["grad"]).norm() / a["grad"].norm()).item()
    result["grad_cosine"] = torch.nn.functional.cosine_similarity(a["grad"], b["grad"], dim=0).item()
    return result


def speed(workdir: Path, *, gradient_checkpointing: bool, batch_size: int, max_length: int, steps: int) -> list[dict]:
    """Steps of the fp32 and the bf16 trainer interleaved (fp32, bf16, fp32, ...), so load from other work hits both alike."""
    trainers = {d: build_trainer(config(workdir / f"{d}-{gradient_checkpointing}", d, gradient_checkpointing=gradient_checkpointing,
                                        batch_size=batch_size, max_length=max_length, steps=steps)) for d in ("float32", "bfloat16")}
    seconds: dict[str, list[float]] = {d: [] for d in trainers}
    cpu_seconds: dict[str, list[float]] = {d: [] for d in trainers}
    for step in range(steps):
        for dtype, trainer in trainers.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            trainer.optimizer_step(trainer.step_micro_batches(0, step))
            seconds[dtype].append(time.perf_counter() - started)
            cpu_seconds[dtype].append(time.process_time() - cpu_started)
    # CPU seconds (all threads) are what to compare on a shared machine: wall time there counts the others' work too.
    rows = [{"dtype": d, "gradient_checkpointing": gradient_checkpointing, "step_seconds": seconds[d],
             "step_cpu_seconds": cpu_seconds[d], "median_s": statistics.median(seconds[d][1:]),
             "median_cpu_s": statistics.median(cpu_seconds[d][1:])} for d in trainers]
    rows[1]["speedup_bf16_vs_fp32_wall"] = rows[0]["median_s"] / rows[1]["median_s"]
    rows[1]["speedup_bf16_vs_fp32_cpu"] = rows[0]["median_cpu_s"] / rows[1]["median_cpu_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--agreement-only", action="store_true")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--checkpointing", type=lambda v: v == "on", nargs="+", default=[False, True], help="on / off (default: both)")
    args = parser.parse_args()
    import tempfile

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    machine = {"cpu": cpu, "bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f), "bf16_native": bf16_matmul_supported(),
               "threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    print(json.dumps(machine), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as workdir:
        result = {"machine": machine}
        if not args.speed_only:
            result["agreement"] = agreement(Path(workdir), batch_size=args.batch_size, max_length=args.max_length)
            print(json.dumps(result["agreement"], indent=1), flush=True)
        if not args.agreement_only:
            result["speed"] = []
            for checkpointing in args.checkpointing:
                rows = speed(Path(workdir), gradient_checkpointing=checkpointing, batch_size=args.batch_size,
                             max_length=args.max_length, steps=args.steps)
                for row in rows:
                    row["load_after"] = os.getloadavg()
                    print(json.dumps(row), flush=True)
                result["speed"].extend(rows)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
