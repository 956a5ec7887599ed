"""DPO vs CPO (constrained DPO) on the same budget: validation preference accuracy and negative-margin fraction over steps.

    python examples/compare_dpo_cpo.py                       # the measured setting in docs/CPO.md (41 min on 2 busy CPU cores)
    python examples/compare_dpo_cpo.py --train-pairs 512     # a longer run
    python examples/compare_dpo_cpo.py --reuse               # only redo the table and plot from existing run folders

Both runs train a LoRA adapter on SmolLM2-135M-Instruct (the embedded default model) with the same
hh-rlhf-harmless train pairs in the same order, the same validation pairs, learning rate, schedule,
steps and seed. Only `method.loss_type` differs, plus CPO's `method.constraints`.

Writes, under --output-dir: `dpo/` and `cpo/` (ordinary run folders, each with its own summary.md),
`comparison.md` (table), `comparison.json` (the same numbers) and `comparison.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from preftune.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from preftune.config import validate_config  # noqa: E402
from preftune.run import train  # noqa: E402
from preftune.runfolder import read_jsonl as read_metrics  # noqa: E402

METHODS = ("dpo", "cpo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/compare_dpo_cpo")
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or a local Hugging Face folder")
    parser.add_argument("--train-pairs", type=int, default=96)
    parser.add_argument("--validation-pairs", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--eval-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    # CPO: see docs/CPO.md ("The measured comparison") for why these differ from the library defaults
    # in a run this short: the constraint is put on the summed margin, whose sign is the reported
    # negative-margin fraction, at a threshold the margins of a 12-step run can actually reach.
    parser.add_argument("--margin-threshold", type=float, default=0.5)
    parser.add_argument("--length-normalize", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--mode", choices=("soft", "hard"), default="soft")
    parser.add_argument("--lagrangian-lr", type=float, default=0.1)
    parser.add_argument("--lambda-step-clip", type=float, default=0.1)
    parser.add_argument("--lambda-max", type=float, default=10.0)
    parser.add_argument("--reuse", action="store_true", help="do not train; read the existing run folders")
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, method: str):
    method_section: dict = {"loss_type": "sigmoid" if method == "dpo" else "cpo", "beta": args.beta}
    if method == "cpo":
        method_section["constraints"] = {
            "margin_threshold": args.margin_threshold,
            "length_normalize": args.length_normalize,
            "mode": args.mode,
            "lagrangian_lr": args.lagrangian_lr,
            "lambda_step_clip": args.lambda_step_clip,
            "lambda_max": args.lambda_max,
            # One evaluation above the alert level is enough to show up in the comparison, but a run this
            # short should not have its LR cut: the comparison is about the loss, not the LR rule.
            "violation_alert": None,
        }
    return validate_config(
        {
            "output_dir": str(Path(args.output_dir) / method),
            "overwrite_output_dir": True,
            "model": {"name_or_path": args.model, "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}},
            "data": {
                "train_file": "hh-rlhf-harmless:train",
                "validation_file": "hh-rlhf-harmless:validation",
                "max_train_samples": args.train_pairs,
                "max_validation_samples": args.validation_pairs,
                "max_length": args.max_length,
                "max_prompt_length": args.max_length * 2 // 3,
            },
            "method": method_section,
            "training": {
                "learning_rate": args.learning_rate,
                "per_device_train_batch_size": args.batch_size,
                "num_train_epochs": 1,
                "warmup_ratio": 0.1,
                "eval_steps": args.eval_steps,
                "save_steps": None,
                "seed": args.seed,
                "report_to": ["jsonl"],
            },
        },
        source="compare_dpo_cpo",
    )


def curves(run_dir: Path) -> dict[str, list]:
    """Validation metrics per evaluation, and λ per step (CPO), from a run folder's metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval/loss" in r]
    steps = [r for r in records if "lagrangian/lambda" in r and "loss" in r]
    return {
        "eval_step": [r["step"] for r in evals],
        "accuracy": [r["eval/rewards/accuracies"] for r in evals],
        "negative_margin_fraction": [r["eval/negative_margin_fraction"] for r in evals],
        "reward_margin": [r["eval/rewards/margins"] for r in evals],
        "violation_fraction": [r.get("eval/constraint/violated") for r in evals],
        "step": [r["step"] for r in steps],
        "lambda": [r["lagrangian/lambda"] for r in steps],
    }


def table(results: dict[str, dict[str, list]]) -> list[str]:
    dpo, cpo = results["dpo"], results["cpo"]
    lambda_at = dict(zip(cpo["step"], cpo["lambda"]))
    lines = [
        "| step | accuracy DPO | accuracy CPO | negative-margin DPO | negative-margin CPO | CPO pairs below τ | CPO λ |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, step in enumerate(dpo["eval_step"]):
        violated = cpo["violation_fraction"][i]
        lines.append(
            f"| {step} | {dpo['accuracy'][i]:.3f} | {cpo['accuracy'][i]:.3f} | {dpo['negative_margin_fraction'][i]:.3f} | "
            f"{cpo['negative_margin_fraction'][i]:.3f} | {'' if violated is None else f'{violated:.3f}'} | "
            f"{lambda_at.get(step, 0.0):.3f} |"
        )
    return lines


def plot(results: dict[str, dict[str, list]], path: Path) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for method, style in zip(METHODS, ("o-", "s-")):
        data = results[method]
        axes[0].plot(data["eval_step"], data["accuracy"], style, label=method.upper())
        axes[1].plot(data["eval_step"], data["negative_margin_fraction"], style, label=method.upper())
    axes[0].set_ylabel("validation preference accuracy")
    axes[1].set_ylabel("validation negative-margin fraction")
    cpo = results["cpo"]
    axes[2].plot(cpo["step"], cpo["lambda"], color="tab:orange", label="λ (per step)")
    axes[2].set_ylabel("CPO λ")
    violation_axis = axes[2].twinx()
    violation_axis.plot(cpo["eval_step"], cpo["violation_fraction"], "s--", color="tab:red", label="validation pairs below τ")
    violation_axis.set_ylabel("CPO validation pairs below τ")
    violation_axis.set_ylim(0, 1)
    for axis in axes:
        axis.set_xlabel("optimiser step")
        axis.legend(loc="best")
    violation_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir)
    if not args.reuse:
        for method in METHODS:
            print(f"\n=== training {method.upper()} ===", file=sys.stderr)
            train(run_config(args, method))
    results = {method: curves(output / method) for method in METHODS}
    if results["dpo"]["eval_step"] != results["cpo"]["eval_step"]:
        raise SystemExit("the two runs evaluated at different steps; rerun without --reuse")
    settings = {k: v for k, v in vars(args).items() if k not in ("reuse",)}
    lines = [
        "# DPO vs CPO (constrained DPO), same data, budget and seed",
        "",
        f"settings: `{json.dumps(settings)}`",
        "",
        *table(results),
        "",
        "accuracy = validation pairs with reward margin > 0; negative-margin = pairs with reward margin < 0 "
        "(reward margin = β·(policy − reference) log-ratio difference, summed over answer tokens); "
        "CPO pairs below τ = validation pairs violating the CPO margin constraint.",
    ]
    atomic_write_text(output / "comparison.md", "\n".join(lines) + "\n")
    atomic_write_json(output / "comparison.json", {"settings": settings, "results": results})
    plot(results, output / "comparison.png")
    print("\n".join(lines))
    print(f"\nwrote {output / 'comparison.md'} and {output / 'comparison.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
