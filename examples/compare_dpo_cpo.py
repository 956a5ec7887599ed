"""DPO vs CPO (constrained DPO) at equal compute, over several seeds, with intervals on every difference.

    python examples/compare_dpo_cpo.py                                    # the study in docs/CPO.md
    python examples/compare_dpo_cpo.py --seeds 1 2 3 4 5 --train-pairs 1024
    python examples/compare_dpo_cpo.py --split tune --variant tau05=cpo,constraints.margin_threshold=0.5
    python examples/compare_dpo_cpo.py --reuse                            # only redo the tables from the run folders

Every variant trains a LoRA adapter on SmolLM2-135M-Instruct (the embedded default) with the same
hh-rlhf-harmless train pairs; a seed fixes the data order and the adapter's initialisation, so
seed s of every variant sees the same batches. Only what a variant names differs between variants.

Two evaluation splits, so that settings are never chosen on the numbers they are judged by:
  --split validation   the whole `hh-rlhf-harmless:validation` split (the comparison)
  --split tune         the last --tune-pairs pairs of the train split, which no run trains on (sweeps)

A variant is `NAME=LOSS_TYPE[,key=value,...]` with keys of the `method:` section (dotted for nested
ones, values read as YAML); `dpo` and `cpo` alone mean the library defaults of those methods.
The first variant is the baseline every other one is compared with.

Per evaluation and variant it reports, from the run folders' per-pair rows (evaluations/step-N.jsonl):
  accuracy                share of pairs whose summed implicit-reward margin is > 1e-4
  negative-margin (sum)   share of pairs whose summed margin is < −1e-4
  negative-margin (tok)   the same with the length-normalised margin (the design's definition)
  Δ log p(chosen|rejected) per-token mean log-prob of the answer minus the reference's, mean over pairs
  λ                       CPO's multiplier at the end, and wall time of training
Intervals are 95% hierarchical bootstrap intervals (seeds resampled, then pairs; a difference resamples the
same seeds and pairs for both variants, so it is paired).

Writes, under --output-dir/<split>: one run folder per variant and seed, `comparison.md`,
`comparison.json` (every number, per seed too) and `comparison.png`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from preftune.allocator import exec_with_fast_allocator  # noqa: E402
from preftune.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from preftune.config import apply_override, validate_config  # noqa: E402
from preftune.data.pipeline import resolve_data_path  # noqa: E402
from preftune.methods.evaluation import TIE_TOLERANCE, per_token_margin  # noqa: E402
from preftune.run import train  # noqa: E402
from preftune.runfolder import evaluation_steps, read_run  # noqa: E402

BOOTSTRAP_SAMPLES = 2000
METRICS = {
    "accuracy": "accuracy",
    "nmf_sum": "negative-margin (sum)",
    "nmf_token": "negative-margin (tok)",
    "chosen_delta": "Δ log p(chosen)/tok",
    "rejected_delta": "Δ log p(rejected)/tok",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/compare_dpo_cpo")
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or a local Hugging Face folder")
    parser.add_argument("--split", choices=("validation", "tune"), default="validation")
    parser.add_argument("--variant", action="append", dest="variants", help="NAME=LOSS_TYPE[,key=value...]; repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--train-pairs", type=int, default=512)
    parser.add_argument("--validation-pairs", type=int, default=None, help="default: the whole split")
    parser.add_argument("--tune-pairs", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--evaluations", type=int, default=4, help="evaluations during training (plus one before)")
    parser.add_argument("--keep-merged", action="store_true", help="keep final/merged of every run (about 0.5 GB each)")
    parser.add_argument("--reuse", action="store_true", help="do not train; read the existing run folders")
    args = parser.parse_args(argv)
    args.variants = args.variants or ["dpo", "cpo"]
    return args


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`NAME=LOSS_TYPE,key=value,...` (or just `dpo`/`cpo`) → (name, `--set`-style overrides).

    Keys are of the `method:` section (dotted for nested ones); keys starting with `model.`,
    `training.` or `data.` go to those sections instead (e.g. `model.dtype=float32`).
    """
    name, _, spec = text.partition("=")
    loss_type, *items = (spec or {"dpo": "sigmoid"}.get(name, name)).split(",")
    overrides = [f"method.loss_type={loss_type}"]
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--variant {text}: {item!r} is not key=value")
        section = item.split(".", 1)[0]
        overrides.append(item if section in ("model", "training", "data") else f"method.{item}")
    return name, overrides


def tune_file(args: argparse.Namespace) -> Path:
    """The last --tune-pairs lines of the train split, written once; no run trains on them."""
    lines = resolve_data_path("hh-rlhf-harmless:train").read_text(encoding="utf-8").splitlines()
    if args.train_pairs > len(lines) - args.tune_pairs:
        raise SystemExit(f"--train-pairs {args.train_pairs} would overlap the {args.tune_pairs} tune pairs ({len(lines)} lines)")
    path = Path(args.output_dir) / "tune.jsonl"
    text = "\n".join(lines[-args.tune_pairs :]) + "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


def run_config(args: argparse.Namespace, run_dir: Path, overrides: list[str], seed: int, validation_file: str):
    steps = args.train_pairs // args.batch_size
    base = {
            "output_dir": str(run_dir),
            "overwrite_output_dir": True,
            "model": {
                "name_or_path": args.model,
                "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": ["q_proj", "v_proj"]},
            },
            "data": {
                "train_file": "hh-rlhf-harmless:train",
                "validation_file": validation_file,
                "max_train_samples": args.train_pairs,
                "max_validation_samples": args.validation_pairs,
                "max_length": args.max_length,
                "max_prompt_length": args.max_length * 2 // 3,
            },
            "method": {"beta": args.beta},
            # The shipped harmlessness probes, scored before/after: which settings move them is what the demo is chosen by.
            "probes": {"generations": 0},
            "training": {
                "learning_rate": args.learning_rate,
                "per_device_train_batch_size": args.batch_size,
                "num_train_epochs": 1,
                "warmup_ratio": 0.1,
                "eval_steps": max(1, steps // args.evaluations),
                "save_steps": None,
                "seed": seed,
                "report_to": ["jsonl"],
            },
        }
    for override in overrides:
        apply_override(base, override)
    return validate_config(base, source="compare_dpo_cpo")


def finished(run_dir: Path) -> bool:
    identity = run_dir / "run.json"
    return identity.exists() and json.loads(identity.read_text()).get("status") == "finished"


def pair_values(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per-pair 0/1 indicators and log-prob deltas whose means are the reported metrics."""
    margins = np.array([row["rewards/margins"] for row in rows])
    per_token = np.array([per_token_margin(row) for row in rows])
    chosen = np.array([(row["policy_logps"][0] - row["reference_logps"][0]) / row["answer_tokens"][0] for row in rows])
    rejected = np.array([(row["policy_logps"][1] - row["reference_logps"][1]) / row["answer_tokens"][1] for row in rows])
    return {
        "accuracy": (margins > TIE_TOLERANCE).astype(float),
        "nmf_sum": (margins < -TIE_TOLERANCE).astype(float),
        "nmf_token": (per_token < -TIE_TOLERANCE).astype(float),
        "chosen_delta": chosen,
        "rejected_delta": rejected,
    }


def read_variant(run_dirs: list[Path]) -> dict:
    """Per seed: per-pair values at every evaluation, λ at the end, wall time."""
    seeds = []
    for run_dir in run_dirs:
        records = read_run(run_dir)
        lagrangian = records.controllers.get("lagrangian", {})
        seeds.append(
            {
                "evaluations": {step: pair_values(rows) for step, rows in records.evaluations.items()},
                "lambda": lagrangian.get("lambda"),
                "train_seconds": records.identity.get("train_seconds"),
            }
        )
    return {"seeds": seeds}


def bootstrap_interval(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of the mean of `values` [seeds, pairs]: seeds resampled, then pairs (the same for every seed)."""
    seeds, pairs = values.shape
    seed_draws = rng.integers(0, seeds, size=(BOOTSTRAP_SAMPLES, seeds))
    pair_draws = rng.integers(0, pairs, size=(BOOTSTRAP_SAMPLES, pairs))
    means = np.array([values[s][:, p].mean() for s, p in zip(seed_draws, pair_draws)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(results: dict[str, dict], baseline: str, step: int, seed: int = 0) -> dict[str, dict]:
    """Mean, interval, and the paired difference to the baseline with its interval, per variant and metric."""
    out: dict[str, dict] = {}
    base = results[baseline]["seeds"]
    for name, variant in results.items():
        rng = np.random.default_rng(seed)
        entry: dict = {}
        for metric in METRICS:
            values = np.stack([s["evaluations"][step][metric] for s in variant["seeds"]])
            item = {"mean": float(values.mean()), "interval": bootstrap_interval(values, rng),
                    "per_seed": [float(v) for v in values.mean(axis=1)]}
            if name != baseline:
                difference = values - np.stack([s["evaluations"][step][metric] for s in base])
                item["difference"] = float(difference.mean())
                item["difference_interval"] = bootstrap_interval(difference, rng)
            entry[metric] = item
        lambdas = [s["lambda"] for s in variant["seeds"] if s["lambda"] is not None]
        entry["lambda"] = float(np.mean(lambdas)) if lambdas else None
        entry["train_seconds"] = float(np.median([s["train_seconds"] for s in variant["seeds"]]))
        out[name] = entry
    return out


def table(summary: dict[str, dict], baseline: str) -> list[str]:
    header = "| variant | " + " | ".join(METRICS.values()) + " | λ end | train s (median) |"
    lines = [header, "|---" + "|---:" * (len(METRICS) + 2) + "|"]
    for name, entry in summary.items():
        cells = []
        for metric in METRICS:
            item = entry[metric]
            low, high = item["interval"]
            cell = f"{item['mean']:.3f} [{low:.3f}, {high:.3f}]"
            if "difference" in item:
                d_low, d_high = item["difference_interval"]
                excludes = "**" if d_low > 0 or d_high < 0 else ""
                cell += f"<br>Δ {excludes}{item['difference']:+.3f} [{d_low:+.3f}, {d_high:+.3f}]{excludes}"
            cells.append(cell)
        lam = "" if entry["lambda"] is None else f"{entry['lambda']:.3f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {lam} | {entry['train_seconds']:.0f} |")
    lines += ["", f"Δ = variant − {baseline}, paired by seed and pair; **bold** where the 95% interval excludes 0."]
    return lines


def curve_table(results: dict[str, dict], steps: list[int]) -> list[str]:
    names = list(results)
    lines = ["| step | " + " | ".join(f"{n} acc / nmf(tok)" for n in names) + " |", "|---:" + "|---:" * len(names) + "|"]
    for step in steps:
        cells = []
        for name in names:
            seeds = results[name]["seeds"]
            acc = np.mean([s["evaluations"][step]["accuracy"].mean() for s in seeds])
            nmf = np.mean([s["evaluations"][step]["nmf_token"].mean() for s in seeds])
            cells.append(f"{acc:.3f} / {nmf:.3f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict[str, dict], steps: list[int], path: Path) -> None:
    figure, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for name, variant in results.items():
        for axis, metric in zip(axes, ("accuracy", "nmf_token", "chosen_delta", "rejected_delta")):
            per_seed = np.array([[s["evaluations"][step][metric].mean() for step in steps] for s in variant["seeds"]])
            axis.plot(steps, per_seed.mean(axis=0), "o-", label=name)
            axis.fill_between(steps, per_seed.min(axis=0), per_seed.max(axis=0), alpha=0.15)
            axis.set_ylabel(METRICS[metric])
    for axis in axes:
        axis.set_xlabel("optimiser step")
        axis.legend(loc="best")
    figure.suptitle("mean over seeds; band = seed range")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir) / args.split
    validation_file = "hh-rlhf-harmless:validation" if args.split == "validation" else str(tune_file(args))
    variants = dict(parse_variant(v) for v in args.variants)
    baseline = next(iter(variants))
    run_dirs = {name: [output / name / f"seed-{seed}" for seed in args.seeds] for name in variants}
    # Seed by seed, so a study cut short still has every variant at the seeds it reached.
    for index, seed in enumerate(args.seeds):
        for name, overrides in variants.items():
            run_dir = run_dirs[name][index]
            if args.reuse or finished(run_dir):
                continue
            print(f"\n=== {args.split}: {name} seed {seed} ===", file=sys.stderr)
            train(run_config(args, run_dir, overrides, seed, validation_file))
            if not args.keep_merged:
                shutil.rmtree(run_dir / "final" / "merged", ignore_errors=True)
    results = {name: read_variant(dirs) for name, dirs in run_dirs.items()}
    steps = evaluation_steps(run_dirs[baseline][0])
    summary = summarise(results, baseline, steps[-1])
    pairs = len(results[baseline]["seeds"][0]["evaluations"][steps[-1]]["accuracy"])
    settings = {k: v for k, v in vars(args).items() if k != "reuse"}
    lines = [
        f"# DPO vs CPO at equal compute: {len(args.seeds)} seeds, {pairs} {args.split} pairs, after step {steps[-1]}",
        "",
        f"settings: `{json.dumps(settings)}`",
        "",
        "variants: " + "; ".join(f"`{name}` = `{json.dumps(o)}`" for name, o in variants.items()),
        "",
        *table(summary, baseline),
        "",
        "## Over training (mean over seeds)",
        "",
        *curve_table(results, steps),
        "",
        "Ties (|margin| ≤ 1e-4) count as neither right nor wrong. Intervals: 95% hierarchical bootstrap "
        f"({BOOTSTRAP_SAMPLES} draws; seeds, then pairs). Δ log p = per-token log-prob of the answer minus the reference's.",
    ]
    atomic_write_text(output / "comparison.md", "\n".join(lines) + "\n")
    atomic_write_json(output / "comparison.json", {"settings": settings, "variants": variants, "summary": summary})
    plot(results, steps, output / "comparison.png")
    print("\n".join(lines))
    print(f"\nwrote {output / 'comparison.md'} and {output / 'comparison.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exec_with_fast_allocator()  # as the `preftune` command does (preftune/allocator.py)
    sys.exit(main())
