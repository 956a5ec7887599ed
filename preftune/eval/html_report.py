"""The report of a run, rebuilt from its run folder alone: `summary.md`, `plots/*.png` and `report.html`.

`build_report(run_dir)` reads `preftune.runfolder.read_run(run_dir)` (plus the optional
`data_audit.json` and `probes.json` beside it) and never a live trainer, so `preftune report
RUN_DIR` gives the same report for a finished, interrupted or copied run.

The report is a list of `ReportSection(title, markdown_lines, figures)`. The run's method adds
its own section through its declaration (`Method.report_section` and `Method.report_curves`,
preftune/methods): CPO's shows τ, λ and the step loss split into preference loss and λ · hinge.

Judgements come from the per-example rows of the first and last evaluation
(`evaluations/step-N.jsonl`): a margin |m| ≤ TIE_TOLERANCE is a tie, and every before → after
verdict carries the paired bootstrap interval of the change ("no clear change" when it spans 0).
At step 0 the policy is the reference, so every pair is a tie: ranking metrics then say
"all tied" and the trained accuracy is judged against chance (0.5) instead.

`report.html` is self-contained: inline CSS, figures embedded as base64 data URIs, no scripts,
no external resources; raw HTML in any value read from the folder is shown as text.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import markdown
import numpy as np
import yaml

from preftune.atomic import atomic_write_text
from preftune.errors import PreftuneError
from preftune.control.alerts import GUIDANCE, Alert, AlertSettings, evaluate_alerts
from preftune.eval.plots import plot_margin_evolution, plot_metric_curves, plot_training_curves
from preftune.eval.probes import PROBES_FILE, render_generation_rows, render_probe_rows
from preftune.eval.stats import (
    Interval,
    paired_bootstrap,
    proportion_interval,
    verdict_from_interval,
)
from preftune.methods import get_method
from preftune.methods.evaluation import TIE_TOLERANCE
from preftune.runfolder import DATA_AUDIT, HTML_REPORT, PLOTS, SUMMARY, RunRecords, read_run

DATA_AUDIT_FILE = DATA_AUDIT
CHANCE = 0.5

FILE_DESCRIPTIONS = {
    "config.yaml": "the resolved run config",
    "run.json": "identity: method, config hash, data fingerprint, versions",
    "data_report.txt": "what loading kept, skipped and truncated",
    DATA_AUDIT_FILE: "the data audit",
    "metrics.jsonl": "every logged training step and evaluation",
    "alerts.jsonl": "alerts raised during training",
    "evaluations": "per-example validation results, one file per evaluation",
    "controllers.json": "every controller's final state (CPO's λ and its history)",
    "checkpoints": "resumable checkpoints (`--set resume_from=latest`)",
    "final": "the trained adapter (`final/adapter/`) and a plain merged model (`final/merged/`)",
    "tensorboard": "TensorBoard event files",
    PROBES_FILE: "probe log-probs and greedy answers before and after training",
    PLOTS: "the figures of this report",
    SUMMARY: "this report as Markdown",
    HTML_REPORT: "this report as one self-contained HTML page",
}


class RunFolderError(PreftuneError):
    """A folder that is not a preftune run folder."""


@dataclass
class ReportSection:
    title: str
    markdown_lines: list[str]
    figures: list[Path] = field(default_factory=list)


@dataclass
class ReportPaths:
    summary: Path
    html: Path
    plots: list[Path]


# ---------------------------------------------------------------------------------------------
# Per-example values of one evaluation


def _beta(records: RunRecords) -> float:
    return float(records.config.get("method", {}).get("beta", 0.1))


def example_margins(row: Mapping[str, Any], beta: float) -> float | None:
    """The row's reward margin: its `rewards/margins`, else β · ((πc − πr) − (refc − refr)) from the summed log-probs."""
    if isinstance(row.get("rewards/margins"), (int, float)):
        return float(row["rewards/margins"])
    policy, reference = row.get("policy_logps"), row.get("reference_logps")
    if not policy or len(policy) != 2:
        return None
    margin = policy[0] - policy[1]
    if reference:
        margin -= reference[0] - reference[1]
    return beta * margin


def _per_token(row: Mapping[str, Any], slot: int) -> float | None:
    policy, tokens = row.get("policy_logps"), row.get("answer_tokens")
    if not policy or not tokens or len(policy) != 2:
        return None
    return policy[slot] / max(tokens[slot], 1)


def _numeric(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class Judged:
    """One row of the before → after table."""

    label: str
    before: str
    after: str
    change: str
    wanted: str
    verdict: str
    interval: Interval | None = None


# (label, per-example value(row, beta), wanted, ranks pairs by margin?)
_TABLE: list[tuple[str, Callable[[Mapping[str, Any], float], float | None], str, bool]] = [
    ("preference accuracy", lambda r, b: None if (m := example_margins(r, b)) is None else float(m > TIE_TOLERANCE), "higher", True),
    ("negative-margin fraction", lambda r, b: None if (m := example_margins(r, b)) is None else float(m < -TIE_TOLERANCE), "lower", True),
    ("mean reward margin", example_margins, "higher", False),
    ("log p(chosen) per token", lambda r, b: _per_token(r, 0), "higher", False),
    ("log p(rejected) per token", lambda r, b: _per_token(r, 1), "lower", False),
    ("pairs below the CPO margin threshold τ", lambda r, b: _numeric(r, "constraint/violated"), "lower", False),
    ("CPO constraint margin", lambda r, b: _numeric(r, "constraint/margin"), "higher", False),
    ("validation loss", lambda r, b: _numeric(r, "loss"), "lower", False),
]


# A reward model's evaluation rows carry its scores in `policy_logps`: these rows would read them as log-probs.
_LOG_PROB_ROWS = {"log p(chosen) per token", "log p(rejected) per token"}


def _scores_not_log_probs(records: RunRecords) -> bool:
    try:
        return get_method(records.method).model_kind == "reward_model"
    except PreftuneError:
        return False


def _paired_values(before_rows, after_rows, value, beta) -> tuple[list[float], list[float]]:
    before_by_example = {row.get("example", i): row for i, row in enumerate(before_rows)}
    before, after = [], []
    for i, row in enumerate(after_rows):
        match = before_by_example.get(row.get("example", i))
        if match is None:
            continue
        start, end = value(match, beta), value(row, beta)
        if start is not None and end is not None:
            before.append(start)
            after.append(end)
    return before, after


def all_tied(rows: Sequence[Mapping[str, Any]], beta: float) -> bool:
    margins = [m for row in rows if (m := example_margins(row, beta)) is not None]
    return bool(margins) and all(abs(m) <= TIE_TOLERANCE for m in margins)


def judge_before_after(records: RunRecords) -> tuple[list[Judged], int, int] | None:
    """The before → after table from the first and last evaluation, or None with fewer than two."""
    steps = sorted(records.evaluations)
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]
    before_rows, after_rows = records.evaluations[first], records.evaluations[last]
    beta = _beta(records)
    tied_before = all_tied(before_rows, beta)
    constrained = any("constraint/hinge" in row for row in after_rows)
    skipped = _LOG_PROB_ROWS if _scores_not_log_probs(records) else set()
    judged = []
    for label, value, wanted, ranking in _TABLE:
        if label in skipped:
            continue
        before, after = _paired_values(before_rows, after_rows, value, beta)
        if not after:
            continue
        if label == "validation loss" and constrained:
            judged.append(Judged(f"{label} (includes λ · hinge)", f"{np.mean(before):.4f}", f"{np.mean(after):.4f}", "", wanted, "not judged: λ changes over the run"))
            continue
        if ranking and tied_before:
            interval = proportion_interval(after)
            if label == "preference accuracy":
                shifted = Interval(interval.estimate - CHANCE, interval.low - CHANCE, interval.high - CHANCE, interval.confidence, interval.method, interval.n)
                text = verdict_from_interval(shifted, wanted)
                text = {"✓ rose": "✓ above chance", "✗ fell": "✗ below chance"}.get(text, "no clear change from chance")
                judged.append(Judged(label, "all tied", f"{interval.estimate:.4f}", f"vs chance 0.5: [{interval.low:.3f}, {interval.high:.3f}]", wanted, text, interval))
            else:
                judged.append(Judged(label, "all tied", f"{interval.estimate:.4f}", f"[{interval.low:.3f}, {interval.high:.3f}]", wanted, "not judged: every pair was tied before"))
            continue
        interval = paired_bootstrap(before, after)
        judged.append(
            Judged(label, f"{np.mean(before):.4f}", f"{np.mean(after):.4f}", f"{interval.estimate:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]", wanted, verdict_from_interval(interval, wanted), interval)
        )
    return judged, first, last


# ---------------------------------------------------------------------------------------------
# Sections


def verdict_section(records: RunRecords, table: tuple[list[Judged], int, int] | None, judged_alerts: Sequence[Alert]) -> ReportSection:
    during, after = len(records.alerts), len(judged_alerts)
    alert_text = (
        f"Alerts: {during} during training, {after} on the finished metric streams (see Alerts)."
        if during or after else "No alerts, during training or on the finished metric streams."
    )
    if table is None:
        return ReportSection("Verdict", [f"**Not judged**: this run folder holds {len(records.evaluations)} evaluation(s); a before → after verdict needs two. {alert_text}"])
    judged, first, last = table
    accuracy = next((row for row in judged if row.label == "preference accuracy"), None)
    if accuracy is None:
        lead = next((row for row in judged if row.interval is not None), None)
        if lead is None:
            return ReportSection("Verdict", [f"**Not judged**: the evaluations hold no comparable values. {alert_text}"])
        accuracy = lead
    if accuracy.before == "all tied":
        detail = (
            f"{accuracy.label} {accuracy.after} after step {last}, 95% interval {accuracy.change.removeprefix('vs chance 0.5: ')} "
            f"against chance 0.5 (every pair was tied at step {first}: the policy was the reference)"
        )
    else:
        detail = f"{accuracy.label} {accuracy.before} → {accuracy.after} (step {first} → {last}), change {accuracy.interval.describe(4)}"
    others = [f"{row.label}: {row.verdict}" for row in judged if row is not accuracy and row.interval is not None]
    lines = [f"**Verdict: {accuracy.verdict}** — {detail}.", ""]
    if others:
        lines += ["Also: " + "; ".join(others) + ".", ""]
    lines.append(alert_text)
    return ReportSection("Verdict", lines)


def config_section(records: RunRecords) -> ReportSection:
    config = records.config
    model = config.get("model", {})
    data = config.get("data", {})
    lora = model.get("lora")
    train_steps = [row["step"] for row in records.train_rows if "loss" in row]  # controllers also log rows without a loss
    lines = [
        f"- method: `{records.method}`",
        f"- model: `{model.get('name_or_path', '?')}` ({'LoRA ' + json.dumps(lora, sort_keys=True) if lora else 'full fine-tune'})",
        f"- data: `{data.get('train_file', '?')}` (validation: `{data.get('validation_file') or 'held out of the train file'}`)",
        f"- optimiser steps logged: {len(train_steps)}, last step {max(train_steps) if train_steps else 0}",
    ]
    for key in ("config_hash", "data_fingerprint", "preftune_version"):
        if key in records.identity:
            lines.append(f"- {key.replace('_', ' ')}: `{records.identity[key]}`")
    lines += ["", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"]
    return ReportSection("Run config", lines)


def _nested_lines(value: Any, depth: int = 0) -> list[str]:
    indent = "    " * depth
    if isinstance(value, Mapping):
        lines = []
        for key, item in value.items():
            if isinstance(item, (Mapping, list)) and item and not _is_scalar_list(item):
                lines.append(f"{indent}- **{key}**")
                lines += _nested_lines(item, depth + 1)
            else:
                lines.append(f"{indent}- **{key}**: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        lines = []
        for index, item in enumerate(value):
            if isinstance(item, (Mapping, list)) and not _is_scalar_list(item):
                lines.append(f"{indent}- [{index}]")
                lines += _nested_lines(item, depth + 1)
            else:
                lines.append(f"{indent}- {_scalar(item)}")
        return lines
    return [f"{indent}- {_scalar(value)}"]


def _is_scalar_list(value: Any) -> bool:
    return isinstance(value, list) and all(not isinstance(item, (Mapping, list)) for item in value)


def _scalar(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_scalar(item) for item in value) or "(none)"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "(empty)"
    return str(value)


def data_audit_section(records: RunRecords) -> ReportSection:
    audit_path = records.run_dir / DATA_AUDIT_FILE
    lines: list[str] = []
    if audit_path.is_file():
        audit = json.loads(audit_path.read_text(encoding="utf-8"))
        lines += _nested_lines(audit) or ["- (empty audit)"]
    if records.data_report.strip():
        lines += ["", "`data_report.txt`:", "", "```text", records.data_report.rstrip(), "```"]
    return ReportSection("Data audit", lines or [f"No `{DATA_AUDIT_FILE}` or `data_report.txt` in this run folder."])


def ranking_by_step(records: RunRecords) -> dict[int, dict[str, float]]:
    """Per evaluation: fractions of pairs won (margin > tol), tied (|margin| ≤ tol) and lost, and the margins."""
    beta = _beta(records)
    result = {}
    for step, rows in records.evaluations.items():
        margins = np.array([m for row in rows if (m := example_margins(row, beta)) is not None], dtype=float)
        if margins.size == 0:
            continue
        result[step] = {
            "accuracy": float((margins > TIE_TOLERANCE).mean()),
            "ties": float((np.abs(margins) <= TIE_TOLERANCE).mean()),
            "negative": float((margins < -TIE_TOLERANCE).mean()),
            "margins": margins,
        }
    return result


def curves_section(records: RunRecords) -> ReportSection:
    ranking = ranking_by_step(records)
    figure = plot_training_curves(records.train_rows, records.eval_rows, ranking, records.run_dir / PLOTS / "training_curves.png")
    lines = []
    if ranking:
        lines += ["| step | validation accuracy | ties | margin < 0 |", "|---|---|---|---|"]
        for step in sorted(ranking):
            r = ranking[step]
            accuracy = "all tied" if r["ties"] >= 1.0 else f"{r['accuracy']:.3f}"
            lines.append(f"| {step} | {accuracy} | {r['ties']:.3f} | {r['negative']:.3f} |")
        lines += ["", f"A pair is a tie when its reward margin is within ±{TIE_TOLERANCE:g}; ties count as neither right nor wrong."]
    if figure is None and not lines:
        lines = ["No training or evaluation rows in `metrics.jsonl`."]
    return ReportSection("Training curves", lines, [figure] if figure else [])


def margins_section(records: RunRecords) -> ReportSection:
    ranking = ranking_by_step(records)
    figure = plot_margin_evolution(
        {step: r["margins"] for step, r in ranking.items()},
        {step: r["negative"] for step, r in ranking.items()},
        TIE_TOLERANCE,
        records.run_dir / PLOTS / "margins.png",
    )
    if figure is None:
        return ReportSection("Reward margins over time", ["No per-example evaluation rows (`evaluations/step-N.jsonl`)."])
    lines = ["| step | pairs | 5th percentile | median | 95th percentile | margin < 0 |", "|---|---|---|---|---|---|"]
    for step in sorted(ranking):
        margins = ranking[step]["margins"]
        p5, p50, p95 = np.percentile(margins, [5, 50, 95])
        lines.append(f"| {step} | {margins.size} | {p5:+.4f} | {p50:+.4f} | {p95:+.4f} | {ranking[step]['negative']:.3f} |")
    return ReportSection("Reward margins over time", lines, [figure])


def before_after_section(table: tuple[list[Judged], int, int] | None) -> ReportSection:
    if table is None:
        return ReportSection("Validation, before → after", ["Needs two evaluations (before and after training)."])
    judged, first, last = table
    lines = [
        f"| metric | step {first} | step {last} | change [95% interval] | wanted | verdict |",
        "|---|---|---|---|---|---|",
        *[f"| {j.label} | {j.before} | {j.after} | {j.change} | {j.wanted} | {j.verdict} |" for j in judged],
        "",
        "Intervals: paired bootstrap over the validation examples (2000 resamples, seed 0); "
        "\"no clear change\" when the interval spans 0.",
    ]
    return ReportSection("Validation, before → after", lines)


def _alert_lines(row: Mapping[str, Any]) -> list[str]:
    means, to_try = row.get("what_it_means"), row.get("what_to_try")
    if not means and not to_try:
        means, to_try = GUIDANCE.get(str(row.get("kind")), (None, None))
    lines = [f"- step {row.get('step', '?')} · **{row.get('kind', '?')}**: {row.get('message', '')}"]
    if means:
        lines.append(f"    - what it means: {means}")
    if to_try:
        lines.append(f"    - what to try: {to_try}")
    return lines


def alert_settings(records: RunRecords) -> AlertSettings:
    """The thresholds the run itself trained with (its `monitoring:` section), so the report judges as training did."""
    monitoring = records.config.get("monitoring") or {}
    return AlertSettings(**{key: value for key, value in monitoring.items() if key in AlertSettings.model_fields})


def alerts_section(records: RunRecords, judged: Sequence[Alert]) -> ReportSection:
    lines = ["During training (`alerts.jsonl`):", ""]
    for row in records.alerts:
        lines += _alert_lines(row)
    if not records.alerts:
        lines.append("- none")
    lines += ["", "Judged again on the finished metric streams (kinds not already raised during training):", ""]
    for alert in judged:
        lines += _alert_lines(alert.to_row())
    if not judged:
        lines.append("- none")
    return ReportSection("Alerts", lines)


def probes_section(records: RunRecords) -> ReportSection:
    path = records.run_dir / PROBES_FILE
    if not path.is_file():
        return ReportSection("Probes", [f"No `{PROBES_FILE}` in this run folder (write one with `preftune probe --output`)."])
    return ReportSection("Probes", render_probe_rows(json.loads(path.read_text(encoding="utf-8"))))


def generations_section(records: RunRecords) -> list[ReportSection]:
    """The probes' greedy answers before and after training, side by side; no section when probes.json has none."""
    path = records.run_dir / PROBES_FILE
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not data.get("generations"):
        return []
    return [ReportSection("Generations, before → after", render_generation_rows(data))]


def timing_section(records: RunRecords) -> ReportSection:
    train = records.train_rows
    times = [row["time"] for row in records.metrics if isinstance(row.get("time"), (int, float))]
    lines = []
    if len(times) >= 2:
        lines.append(f"- wall time from the first to the last logged row: {max(times) - min(times):.1f} s")
    rated = [row for row in train if _numeric(row, "pairs_per_second") and _numeric(row, "pairs")]
    if rated:
        seconds = sum(row["pairs"] / row["pairs_per_second"] for row in rated)
        pairs = sum(row["pairs"] for row in rated)
        lines.append(f"- throughput: {pairs / seconds:.2f} pairs/s over {len(rated)} optimiser steps ({pairs:.0f} pairs, {seconds:.1f} s of step time)")
    for key, value in sorted(records.identity.items()):
        if "peak" in key or "memory" in key:
            lines.append(f"- {key.replace('_', ' ')}: {_scalar(value)}")
    for key in sorted({key for row in train for key in row if "peak" in key or "memory" in key}):
        values = [v for row in train if (v := _numeric(row, key)) is not None]
        if values:
            lines.append(f"- {key.replace('_', ' ')} (max over steps): {max(values):.4g}")
    return ReportSection("Timing and memory", lines or ["No timing rows in `metrics.jsonl`."])


def files_section(records: RunRecords, paths: Sequence[Path]) -> ReportSection:
    run_dir = records.run_dir
    entries = {path.name for path in run_dir.iterdir() if not path.name.startswith(".")} | {SUMMARY, HTML_REPORT, PLOTS}
    lines = []
    for name in sorted(entries):
        path = run_dir / name
        where = f"`{name}/`" if path.is_dir() else f"`{name}`"
        count = f" ({sum(1 for p in path.iterdir() if not p.name.startswith('.'))} entries)" if path.is_dir() else ""
        lines.append(f"- {where}{count}: {FILE_DESCRIPTIONS.get(name, '')}".rstrip(": "))
    lines += ["", "Figures: " + ", ".join(f"`{p.relative_to(run_dir)}`" for p in paths) if paths else "No figures."]
    return ReportSection("Files", lines)


def method_sections(records: RunRecords) -> list[ReportSection]:
    """The section the run's method declares (preftune/methods), with the curves it asks for."""
    try:
        method = get_method(records.method)
    except PreftuneError:
        return []
    section = method.report_section(records) if method.report_section is not None else None
    if section is None:
        return []
    title, lines = section
    curves = [(curve.title, curve.metrics) for curve in method.report_curves]
    figure = plot_metric_curves(records.train_rows, curves, records.run_dir / PLOTS / f"{method.name}_curves.png") if curves else None
    return [ReportSection(title, lines, [figure] if figure else [])]


# ---------------------------------------------------------------------------------------------
# Rendering


def _title(records: RunRecords) -> str:
    return f"preftune run: {records.method} on {records.config.get('model', {}).get('name_or_path', '?')}"


def render_markdown(title: str, sections: Sequence[ReportSection], run_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", "", *section.markdown_lines, ""]
        lines += [f"![{section.title}]({figure.relative_to(run_dir).as_posix()})" for figure in section.figures]
        if section.figures:
            lines.append("")
    return "\n".join(lines)


def markdown_to_html(text: str) -> str:
    """Markdown with tables and fenced code; raw HTML is escaped, never passed through."""
    converter = markdown.Markdown(extensions=["tables", "fenced_code"])
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    return converter.convert(text)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { background: #f4f4f4; padding: 0 .2em; border-radius: 3px; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
pre code { background: none; padding: 0; }
img { max-width: 100%; height: auto; display: block; margin: .8em 0; border: 1px solid #eee; }
section.verdict { background: #f6f8fa; border-left: 4px solid #2a7ae2; padding: .2em 1em; }
"""


def render_html(title: str, sections: Sequence[ReportSection]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for index, section in enumerate(sections):
        css_class = ' class="verdict"' if index == 0 and section.title == "Verdict" else ""
        parts.append(f"<section{css_class}><h2>{html.escape(section.title)}</h2>")
        parts.append(markdown_to_html("\n".join(section.markdown_lines)))
        for figure in section.figures:
            encoded = base64.b64encode(figure.read_bytes()).decode("ascii")
            parts.append(f'<img alt="{html.escape(section.title)}: {html.escape(figure.stem)}" src="data:image/png;base64,{encoded}">')
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_sections(records: RunRecords) -> list[ReportSection]:
    table = judge_before_after(records)
    # Training runs the same rules as it goes (TrainingAlerts): judged again here are only the kinds it did not
    # raise — what a run with alerts off, an eval-only folder or the per-example reference check can still show.
    raised = {row.get("kind") for row in records.alerts}
    judged_alerts = [
        alert for alert in evaluate_alerts(records.metrics, alert_settings(records), evaluations=records.evaluations)
        if alert.kind not in raised
    ]
    sections = [
        verdict_section(records, table, judged_alerts),
        config_section(records),
        data_audit_section(records),
        before_after_section(table),
        curves_section(records),
        margins_section(records),
        *method_sections(records),
        alerts_section(records, judged_alerts),
        probes_section(records),
        *generations_section(records),
        timing_section(records),
    ]
    figures = [figure for section in sections for figure in section.figures]
    return [*sections, files_section(records, figures)]


def build_report(run_dir: str | Path) -> ReportPaths:
    """Rebuild `summary.md`, `plots/*.png` and `report.html` in `run_dir` from its files alone."""
    try:
        records = read_run(run_dir)
    except FileNotFoundError as error:
        raise RunFolderError(str(error)) from None
    sections = build_sections(records)
    title = _title(records)
    summary = records.run_dir / SUMMARY
    page = records.run_dir / HTML_REPORT
    atomic_write_text(summary, render_markdown(title, sections, records.run_dir) + "\n")
    atomic_write_text(page, render_html(title, sections))
    return ReportPaths(summary, page, [figure for section in sections for figure in section.figures])
