"""The end of a run: plots and a short, readable `summary.md` that says whether preference training worked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from preftune import runfolder  # noqa: E402
from preftune.atomic import atomic_write_text  # noqa: E402
from preftune.methods import get_method  # noqa: E402
from preftune.methods.evaluation import TIE_TOLERANCE  # noqa: E402

ROWS = [
    ("eval/loss", "validation loss", "lower"),
    ("eval/rewards/accuracies", "preference accuracy", "higher"),
    ("eval/rewards/margins", "mean reward margin", "higher"),
    ("eval/negative_margin_fraction", "negative-margin fraction", "lower"),
    ("eval/constraint/violated", "pairs below the CPO margin threshold τ", "lower"),
    ("eval/constraint/margin", "mean CPO constraint margin", "higher"),
    ("eval/logps/chosen", "log p(chosen) per token", "higher"),
    ("eval/logps/rejected", "log p(rejected) per token", "lower"),
]
# Rows that count pairs ranked by the implicit-reward margin: meaningless while every margin is a tie.
RANKING_ROWS = {"eval/rewards/accuracies", "eval/negative_margin_fraction"}


def _all_margins_tied(rows: list[dict] | None) -> bool:
    return bool(rows) and "rewards/margins" in rows[0] and all(abs(row["rewards/margins"]) <= TIE_TOLERANCE for row in rows)


def _margins(rows: list[dict] | None) -> torch.Tensor | None:
    if not rows or "rewards/margins" not in rows[0]:
        return None
    return torch.tensor([row["rewards/margins"] for row in rows])


def _throughput(train_metrics: list[dict]) -> float:
    """Pairs per second of optimiser-step time, from each logged step's pairs and rate."""
    steps = [m for m in train_metrics if m.get("pairs_per_second")]
    seconds = sum(m["pairs"] / m["pairs_per_second"] for m in steps)
    return sum(m["pairs"] for m in steps) / seconds if seconds else 0.0


def plot_margin_histogram(before: torch.Tensor | None, after: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6.4, 4))
    bins = 40
    if before is not None:
        axis.hist(before.numpy(), bins=bins, alpha=0.5, label="before training")
    axis.hist(after.numpy(), bins=bins, alpha=0.6, label="after training")
    axis.axvline(0.0, color="black", linewidth=1)
    axis.set_xlabel("reward margin on validation pairs (chosen − rejected)")
    axis.set_ylabel("pairs")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_training_curves(metrics: list[dict], path: Path) -> Path | None:
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval/loss" in m]
    if not train:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot([m["step"] for m in train], [m["loss"] for m in train], label="train", alpha=0.7)
    if evals:
        loss_axis.plot([m["step"] for m in evals], [m["eval/loss"] for m in evals], "o-", label="validation")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    if "rewards/accuracies" in train[0]:
        accuracy_axis.plot([m["step"] for m in train], [m["rewards/accuracies"] for m in train], label="train", alpha=0.7)
    if evals and "eval/rewards/accuracies" in evals[0]:
        accuracy_axis.plot([m["step"] for m in evals], [m["eval/rewards/accuracies"] for m in evals], "o-", label="validation")
    accuracy_axis.set_xlabel("step")
    accuracy_axis.set_ylabel("preference accuracy")
    accuracy_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(run_dir: Path) -> Path:
    """Write plots and `summary.md` from the run folder alone (preftune/runfolder.py); return the summary's path."""
    records = runfolder.read_run(run_dir)
    run_dir = records.run_dir
    config = records.config
    metrics = records.metrics
    alerts = records.alerts
    first_rows, last_rows = records.first_and_last_evaluation()
    evals = records.eval_rows
    before = evals[0] if evals else None
    after = evals[-1] if evals else None
    lora = config.get("model", {}).get("lora")
    identity = records.identity
    train_examples = sum(row.get("pairs", 0) for row in records.train_rows)
    lines = [
        f"# preftune run: {records.method} on {config.get('model', {}).get('name_or_path')}",
        "",
        f"- data: {config.get('data', {}).get('train_file')} → {len(last_rows or [])} validation examples "
        f"(data_report.txt says what was loaded)",
        f"- steps: {identity.get('steps', len(records.train_rows))} ({train_examples:.0f} examples) in "
        f"{identity.get('train_seconds', 0):.0f} s",
        f"- policy: {'LoRA ' + str(lora) if lora else 'full fine-tune'}",
        "",
    ]
    if after is not None:
        lines += ["## Validation, before → after", "", "| metric | before | after | change | wanted |", "|---|---|---|---|---|"]
        verdicts = []
        all_tied = _all_margins_tied(first_rows)
        for key, label, wanted in ROWS:
            if key not in after:
                continue
            start = before.get(key) if before is not after else None
            end = after[key]
            if key in RANKING_ROWS and all_tied:
                # Before training the policy IS the reference: every implicit-reward margin is 0 (up to float noise),
                # so "before" ranks nothing; judge the after against chance instead.
                lines.append(f"| {label} | tie | {end:.4f} | | {wanted} than 0.5 |")
                better = end > 0.5 if wanted == "higher" else end < 0.5
                verdicts.append(f"- {'✓' if better else '✗'} {label} {end:.2f} (0.5 = chance; every pair was a tie before training)")
                continue
            change = "" if start is None else f"{end - start:+.4f}"
            if key == "eval/loss" and "eval/constraint/hinge" in after:
                # CPO's loss includes λ·hinge and λ grows while the constraint is violated: not comparable over time.
                lines.append(f"| {label} (includes λ · hinge) | {'' if start is None else f'{start:.4f}'} | {end:.4f} | {change} | not judged |")
                continue
            lines.append(f"| {label} | {'' if start is None else f'{start:.4f}'} | {end:.4f} | {change} | {wanted} |")
            if start is not None:
                moved_right = (end > start) if wanted == "higher" else (end < start)
                verdicts.append(f"- {'✓' if moved_right else '✗'} {label} {'rose' if end > start else 'fell'}")
        lines += ["", *verdicts, ""]
    train_metrics = [m for m in records.train_rows if "loss" in m]
    if train_metrics:
        lines += [
            "## Training",
            "",
            f"- loss: first step {train_metrics[0]['loss']:.4f}, last step {train_metrics[-1]['loss']:.4f}",
            f"- throughput: {_throughput(train_metrics):.2f} pairs/s (optimiser steps only; evaluation and checkpoints excluded)",
            "",
        ]
    method = get_method(records.method)
    if method.report_section is not None:
        lines += method.report_section(records)
    lines += ["## Alerts", ""]
    lines += [f"- step {a['step']}: {a['kind']}: {a['message']}" for a in alerts] or ["- none"]
    plots = []
    last_margins = _margins(last_rows)
    if last_margins is not None:
        first_margins = _margins(first_rows) if first_rows is not last_rows else None
        plots.append(plot_margin_histogram(first_margins, last_margins, run_dir / runfolder.PLOTS / "margins.png"))
    curves = plot_training_curves(metrics, run_dir / runfolder.PLOTS / "training.png")
    if curves is not None:
        plots.append(curves)
    lines += ["", "## Files", ""]
    lines += [
        "- `metrics.jsonl`, `alerts.jsonl`, `tensorboard/`: every logged number; `evaluations/step-N.jsonl`: every validation example",
        "- `final/adapter/`: the trained adapter (or weights); `final/merged/`: a plain model folder for `AutoModelForCausalLM.from_pretrained`",
        "- `checkpoints/`: resumable with `--set resume_from=latest`",
        *[f"- `{p.relative_to(run_dir)}`" for p in plots],
    ]
    path = run_dir / runfolder.SUMMARY
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
