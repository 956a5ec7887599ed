"""`preftune sweep`: the same short run once per value of one config key, compared on validation.

Each value trains in `<output_dir>/sweep-<param>/<param>-<value>/` (a complete run folder), then
`<output_dir>/sweep-<param>.md` (table + recommendation), `sweep-<param>.csv` and
`plots/sweep-<param>.png` (validation preference accuracy and reward margin per value) are written.

The recommended value has the highest validation preference accuracy; ties go to the larger
per-token log-prob gap between chosen and rejected answers (which, unlike the reward margin,
does not grow with β by construction), or to the larger reward margin where there is no gap
(unpaired validation data).
"""

from __future__ import annotations

import csv
import io
import json
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402

from preftune.atomic import atomic_write_text  # noqa: E402
from preftune.config import RunConfig, apply_override, validate_config  # noqa: E402
from preftune.errors import ConfigError  # noqa: E402
from preftune.eval.html_report import build_report  # noqa: E402
from preftune.run import build_trainer  # noqa: E402

COLUMNS = [
    ("eval/rewards/accuracies", "preference accuracy"),
    ("eval/rewards/margins", "reward margin"),
    ("logps_gap", "log-prob gap (chosen − rejected, per token)"),
    ("eval/loss", "validation loss"),
    ("eval/negative_margin_fraction", "negative-margin fraction"),
    ("run_seconds", "run seconds (load, train, evaluate)"),
]


@dataclass
class SweepRow:
    value: Any
    run_dir: Path
    metrics: dict[str, float]

    def get(self, key: str) -> float | None:
        return self.metrics.get(key)


@dataclass
class SweepResult:
    param: str
    rows: list[SweepRow]
    recommended: SweepRow
    table: Path
    csv: Path
    plot: Path


def parse_values(text: str) -> list[Any]:
    """`0.05,0.1,0.3` → [0.05, 0.1, 0.3]; each value is read as YAML, like `--set`."""
    values = [yaml.safe_load(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ConfigError("--values needs at least one value, e.g. --values 0.05,0.1,0.3,0.5")
    if len({str(v) for v in values}) != len(values):
        raise ConfigError(f"--values repeats a value: {text}")
    return values


def config_key(param: str) -> str:
    """A bare name is a method key (`beta` → `method.beta`); a dotted one is used as is."""
    return param if "." in param else f"method.{param}"


def sweep_configs(config: RunConfig, param: str, values: list[Any]) -> list[RunConfig]:
    """One validated config per value, each with its own run folder under `<output_dir>/sweep-<param>/`."""
    base = config.model_dump(mode="json")
    sweep_dir = Path(config.output_dir) / f"sweep-{param}"
    configs = []
    for value in values:
        raw = deepcopy(base)
        apply_override(raw, f"{config_key(param)}={json.dumps(value)}")  # JSON is YAML: the value parses back unchanged
        raw["output_dir"] = str(sweep_dir / f"{param}-{value}")
        raw["resume_from"] = None
        configs.append(validate_config(raw, source=f"sweep {config_key(param)}={value}"))
    return configs


def run_sweep(config: RunConfig, param: str, values: list[Any], *, console: Console | None = None) -> SweepResult:
    """Train once per value, then write the table, CSV and plot into `config.output_dir`."""

    console = console or Console(stderr=True)
    configs = sweep_configs(config, param, values)
    if config.data.validation_file is None and not config.data.validation_split:
        raise ConfigError("a sweep compares validation results: set data.validation_file or data.validation_split")
    rows = []
    for value, value_config in zip(values, configs):
        console.rule(f"sweep {config_key(param)} = {value}")
        started = time.perf_counter()
        trainer = build_trainer(value_config, console=console)
        result = trainer.train()
        build_report(result.run_dir)
        metrics = dict(result.final_eval or {})
        if "eval/logps/chosen" in metrics and "eval/logps/rejected" in metrics:
            metrics["logps_gap"] = metrics["eval/logps/chosen"] - metrics["eval/logps/rejected"]
        metrics["run_seconds"] = time.perf_counter() - started
        rows.append(SweepRow(value, result.run_dir, metrics))
    recommended = recommend(rows)
    out = Path(config.output_dir)
    table = out / f"sweep-{param}.md"
    csv_path = out / f"sweep-{param}.csv"
    atomic_write_text(table, format_table(param, rows, recommended))
    atomic_write_text(csv_path, format_csv(param, rows))
    plot = plot_sweep(param, rows, recommended, out / "plots" / f"sweep-{param}.png")
    return SweepResult(param, rows, recommended, table, csv_path, plot)


def recommend(rows: list[SweepRow]) -> SweepRow:
    def score(row: SweepRow) -> tuple[float, float]:
        tie_break = row.get("logps_gap") if row.get("logps_gap") is not None else row.get("eval/rewards/margins")
        return (row.get("eval/rewards/accuracies") or 0.0, tie_break if tie_break is not None else 0.0)

    return max(rows, key=score)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def format_table(param: str, rows: list[SweepRow], recommended: SweepRow) -> str:
    lines = [
        f"# preftune sweep: {param}",
        "",
        f"| {param} | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for row in rows:
        mark = " ★" if row is recommended else ""
        lines.append(f"| {row.value}{mark} | " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    lines += [
        "",
        f"Recommended: **{param} = {recommended.value}** (highest validation preference accuracy; ties go to the "
        "larger log-prob gap, or reward margin without one).",
        "",
        "Runs: " + ", ".join(f"`{row.run_dir}`" for row in rows),
        "",
    ]
    return "\n".join(lines)


def format_csv(param: str, rows: list[SweepRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([param, *(key for key, _ in COLUMNS)])
    for row in rows:
        writer.writerow([row.value, *("" if row.get(key) is None else row.get(key) for key, _ in COLUMNS)])
    return buffer.getvalue()


def plot_sweep(param: str, rows: list[SweepRow], recommended: SweepRow, path: Path) -> Path:
    numeric = all(isinstance(row.value, (int, float)) and not isinstance(row.value, bool) for row in rows)
    positions = [row.value if numeric else index for index, row in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, label in (
        (axes[0], "eval/rewards/accuracies", "validation preference accuracy"),
        (axes[1], "eval/rewards/margins", "validation reward margin"),
    ):
        values = [row.get(key) for row in rows]
        axis.plot(positions, [float("nan") if v is None else v for v in values], "o-")
        best = rows.index(recommended)
        if values[best] is not None:
            axis.plot([positions[best]], [values[best]], "*", markersize=14, color="tab:red", label=f"recommended: {recommended.value}")
            axis.legend()
        axis.set_xlabel(param)
        axis.set_ylabel(label)
        if numeric and all(v > 0 for v in positions) and max(positions) / min(positions) >= 10:
            axis.set_xscale("log")
        axis.set_xticks(positions, [str(row.value) for row in rows])
        axis.minorticks_off()
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=110)
    plt.close(figure)
    staging.replace(path)
    return path
