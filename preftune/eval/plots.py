"""The report's figures, each a function of plain numbers read from the run folder; PNGs written atomically.

Every function returns the PNG's path, or None when the run holds nothing to draw.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from preftune.atomic import atomic_write_bytes  # noqa: E402

DPI = 100
HISTOGRAM_BINS = 30


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _points(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows with a finite numeric `key`."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def plot_training_curves(
    train_rows: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[Mapping[str, Any]],
    accuracy_by_step: Mapping[int, Mapping[str, float]],
    path: Path,
) -> Path | None:
    """Panels: loss, preference accuracy, reward margin, learning rate and λ (`lagrangian/lambda`) when logged.

    `accuracy_by_step[step]` = {"accuracy", "ties"} (fractions of the validation pairs, from the
    per-example rows). A validation accuracy whose pairs are all tied is drawn as the words
    "all tied" at 0.5, not as a point at 0: a tie ranks nothing.
    """
    panels = [
        ("loss", "loss", "eval/loss"),
        ("preference accuracy", "rewards/accuracies", None),
        ("reward margin (chosen − rejected)", "rewards/margins", "eval/rewards/margins"),
        ("learning rate", "learning_rate", None),
        ("λ (CPO Lagrange multiplier)", "lagrangian/lambda", None),
    ]
    drawn = [
        panel for panel in panels
        if _points(train_rows, panel[1])[0] or (panel[2] and _points(eval_rows, panel[2])[0])
        or (panel[1] == "rewards/accuracies" and accuracy_by_step)
    ]
    if not drawn:
        return None
    columns = min(3, len(drawn))
    rows = -(-len(drawn) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.8 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat[len(drawn) :]:
        axis.set_visible(False)
    for axis, (label, train_key, eval_key) in zip(axes.flat, drawn):
        steps, values = _points(train_rows, train_key)
        if steps:
            axis.plot(steps, values, label="train", alpha=0.7)
        if eval_key:
            steps, values = _points(eval_rows, eval_key)
            if steps:
                axis.plot(steps, values, "o-", label="validation")
        if train_key == "rewards/accuracies" and accuracy_by_step:
            _draw_validation_accuracy(axis, accuracy_by_step)
        if train_key == "learning_rate":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    return _save(figure, path)


def _draw_validation_accuracy(axis, accuracy_by_step: Mapping[int, Mapping[str, float]]) -> None:
    steps = sorted(accuracy_by_step)
    ranked = [step for step in steps if accuracy_by_step[step]["ties"] < 1.0]
    if ranked:
        axis.plot(ranked, [accuracy_by_step[s]["accuracy"] for s in ranked], "o-", color="C1", label="validation")
        axis.plot(steps, [accuracy_by_step[s]["ties"] for s in steps], "s:", color="grey", label="validation ties")
    for step in steps:
        if accuracy_by_step[step]["ties"] >= 1.0:
            axis.plot([step], [0.5], "o", markerfacecolor="none", color="grey")
            axis.annotate("all tied", (step, 0.5), textcoords="offset points", xytext=(4, 6), fontsize=8, color="grey")
    axis.axhline(0.5, color="black", linewidth=0.5, linestyle="--")
    axis.set_ylim(-0.05, 1.05)


def plot_margin_evolution(
    margins_by_step: Mapping[int, Sequence[float]], negative_fraction_by_step: Mapping[int, float], tie_tolerance: float, path: Path
) -> Path | None:
    """Left: overlaid histograms of validation margins at the first, middle and last evaluation, on bins
    spanning the data (1st to 99th percentile of every margin, widened to include 0). Right: the
    fraction of pairs with margin < −tie_tolerance at every evaluation (the left tail over time)."""
    steps = sorted(step for step, margins in margins_by_step.items() if len(margins))
    if not steps:
        return None
    chosen_steps = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    pooled = np.concatenate([np.asarray(margins_by_step[s], dtype=float) for s in steps])
    low, high = np.percentile(pooled, [1, 99])
    low, high = min(low, 0.0), max(high, 0.0)
    if high - low < 10 * tie_tolerance:  # every margin is a tie: give the spike a visible width
        low, high = -10 * tie_tolerance, 10 * tie_tolerance
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)

    figure, (histogram, tail) = plt.subplots(1, 2, figsize=(10, 3.6))
    for index, step in enumerate(chosen_steps):
        values = np.clip(np.asarray(margins_by_step[step], dtype=float), low, high)  # out-of-range margins land in the edge bins
        tied = bool(np.all(np.abs(values) <= tie_tolerance))
        histogram.hist(values, bins=edges, alpha=0.45, color=f"C{index}", label=f"step {step}{' (all tied)' if tied else ''}")
    histogram.axvline(0.0, color="black", linewidth=1)
    histogram.set_xlabel("validation reward margin (chosen − rejected)")
    histogram.set_ylabel("pairs")
    histogram.legend(fontsize=8)
    tail_steps = sorted(negative_fraction_by_step)
    tail.plot(tail_steps, [negative_fraction_by_step[s] for s in tail_steps], "o-", color="C3")
    tail.set_ylim(bottom=0.0)
    tail.set_xlabel("step")
    tail.set_ylabel("fraction of pairs with margin < 0")
    tail.set_title("left tail over time", fontsize=10)
    return _save(figure, path)


def plot_metric_curves(rows: Sequence[Mapping[str, Any]], curves: Sequence[tuple[str, Sequence[str]]], path: Path) -> Path | None:
    """One panel per (title, metric keys): each logged training metric over steps; None when nothing was logged."""
    panels = [(title, [(key, *_points(rows, key)) for key in keys]) for title, keys in curves]
    panels = [(title, [line for line in lines if line[1]]) for title, lines in panels]
    panels = [(title, lines) for title, lines in panels if lines]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.2), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels):
        for key, steps, values in lines:
            axis.plot(steps, values, label=key)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    return _save(figure, path)
