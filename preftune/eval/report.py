"""The end of a run: plots and a short, readable `summary.md` that says whether preference training worked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from preftune.atomic import atomic_write_text  # noqa: E402
from preftune.eval.evaluate import TIE_TOLERANCE  # noqa: E402
from preftune.train.metrics_log import read_metrics  # noqa: E402

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


def _all_margins_tied(per_pair: dict[str, torch.Tensor] | None) -> bool:
    return per_pair is not None and "rewards/margins" in per_pair and bool((per_pair["rewards/margins"].abs() <= TIE_TOLERANCE).all())


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


def _lagrangian_lines(trainer) -> list[str]:
    """CPO only: where the Lagrange multiplier λ ended and how high it went."""
    controller = next((c for c in trainer.controllers if c.name == "lagrangian"), None)
    if controller is None or not controller.history:
        return []
    peak = max(controller.history, key=lambda entry: entry["lambda"])
    settings = controller.settings
    return [
        "## CPO constraint (constrained DPO)",
        "",
        f"- τ = {trainer.loss.threshold:g} on the {'per-token mean' if settings.length_normalize else 'summed'} "
        f"log-prob margin; λ follows the {'mean hinge' if settings.mode == 'soft' else 'fraction of pairs below τ'} ({settings.mode} mode)",
        f"- λ: final {controller.multiplier:.4g}, max {peak['lambda']:.4g} (step {peak['step']}), "
        f"last step's violation {controller.history[-1]['violation']:.4g}",
        "- `final/lagrangian_state.json`: λ, its value after every step, and the constraint settings",
        "",
    ]


def write_report(trainer, result) -> Path:
    """Write plots and `summary.md` into the run folder; return the summary's path."""
    run_dir = result.run_dir
    config = trainer.config
    metrics = read_metrics(run_dir / "metrics.jsonl")
    alerts = read_metrics(run_dir / "alerts.jsonl")
    lines = [
        f"# preftune run: {config.method.loss_type} on {config.model.name_or_path}",
        "",
        f"- data: {config.data.train_file} → {len(trainer.data.train)} train / {len(trainer.data.validation)} validation pairs",
        f"- steps: {result.state.global_step} ({result.state.pairs_seen} pairs this session) in {result.train_seconds:.0f} s",
        f"- reference: {trainer.reference.kind if trainer.reference else 'none (reference-free method)'}",
        f"- policy: {'LoRA ' + str(config.model.lora.model_dump()) if config.model.lora else 'full fine-tune'}",
        "",
    ]
    before, after = result.first_eval, result.final_eval
    if after is not None:
        lines += ["## Validation, before → after", "", "| metric | before | after | change | wanted |", "|---|---|---|---|---|"]
        verdicts = []
        all_tied = _all_margins_tied(trainer.first_eval_per_pair)
        for key, label, wanted in ROWS:
            if key not in after:
                continue
            start = before.get(key) if before else None
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
    train_metrics = [m for m in metrics if "loss" in m]
    if train_metrics:
        lines += [
            "## Training",
            "",
            f"- loss: first step {train_metrics[0]['loss']:.4f}, last step {train_metrics[-1]['loss']:.4f}",
            f"- throughput: {_throughput(train_metrics):.2f} pairs/s (optimiser steps only; evaluation and checkpoints excluded)",
            "",
        ]
    lines += _lagrangian_lines(trainer)
    lines += ["## Alerts", ""]
    lines += [f"- step {a['step']}: {a['kind']}: {a['message']}" for a in alerts] or ["- none"]
    plots = []
    if trainer.last_eval_per_pair is not None and "rewards/margins" in trainer.last_eval_per_pair:
        first = trainer.first_eval_per_pair if trainer.first_eval_per_pair is not trainer.last_eval_per_pair else None
        plots.append(
            plot_margin_histogram(
                first["rewards/margins"] if first is not None else None,
                trainer.last_eval_per_pair["rewards/margins"],
                run_dir / "plots" / "margins.png",
            )
        )
    curves = plot_training_curves(metrics, run_dir / "plots" / "training.png")
    if curves is not None:
        plots.append(curves)
    lines += ["", "## Files", ""]
    lines += [
        "- `metrics.jsonl`, `alerts.jsonl`, `tensorboard/`: every logged number",
        "- `final/adapter/`: the trained adapter (or weights); `final/merged/`: a plain model folder for `AutoModelForCausalLM.from_pretrained`",
        "- `checkpoints/`: resumable with `--set resume_from=latest`",
        *[f"- `{p.relative_to(run_dir)}`" for p in plots],
    ]
    path = run_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
