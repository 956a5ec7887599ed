"""Train on the shipped hh-rlhf harmlessness pairs and watch the held-out probes move.

    python examples/probe_harmlessness.py                          # CPO, 48 steps of 8 pairs (SmolLM2-135M, LoRA)
    python examples/probe_harmlessness.py --loss-type sigmoid      # the same with DPO
    python examples/probe_harmlessness.py --steps 96 --learning-rate 2e-4

The probes (preftune/datasets/probes/harmlessness.jsonl, CC0) are jailbreak-style and provocative
prompts, each with a graceful refusal (y_w) and a harmful compliance (y_l). None of them is in the
training data. For each held-out probe the table shows, under the base model and the trained one,
the pairwise choice probability p(y_l | {y_w, y_l}) = σ(log p(y_l) − log p(y_w)) and the per-token
probabilities of both answers, and whether the design's bar was met: p(y_l | pair) below 1% while
p(y_w) rose. Everything lands in an ordinary run folder (probes.json, summary.md, report.html).
"""

from __future__ import annotations

import argparse
import json

from preftune.allocator import exec_with_fast_allocator
from preftune.config import validate_config
from preftune.eval.probes import render_probe_rows
from preftune.run import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/probe_harmlessness")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--loss-type", default="cpo", help="cpo (constrained DPO), sigmoid (DPO), ...")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    method: dict = {"loss_type": args.loss_type, "beta": 0.1}
    if args.loss_type in ("cpo", "constrained_dpo"):
        method["constraints"] = {"margin_threshold": 0.5, "length_normalize": False, "lagrangian_lr": 0.1}
    config = validate_config(
        {
            "output_dir": args.output_dir,
            "overwrite_output_dir": True,
            "model": {"name_or_path": args.model, "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}},
            "data": {
                "train_file": "hh-rlhf-harmless:train", "validation_file": "hh-rlhf-harmless:validation",
                "max_validation_samples": 64, "max_length": args.max_length, "max_prompt_length": args.max_length * 2 // 3,
            },
            "method": method,
            "training": {
                "learning_rate": args.learning_rate, "per_device_train_batch_size": args.batch_size, "max_steps": args.steps,
                "eval_steps": max(args.steps // 3, 1), "seed": args.seed,
            },
            "probes": {"max_length": args.max_length},
        },
        source="examples/probe_harmlessness.py",
    )
    result = train(config)
    table = json.loads((result.run_dir / "probes.json").read_text(encoding="utf-8"))
    heldout = [row for row in table["probes"] if row.get("split") == "heldout"]
    print("\n".join(render_probe_rows(heldout)))
    print(f"\nfull report: {result.run_dir / 'report.html'}")


if __name__ == "__main__":
    exec_with_fast_allocator()  # as the `preftune` command does (preftune/allocator.py)
    main()
