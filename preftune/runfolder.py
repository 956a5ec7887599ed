"""The run folder: the contract between training and everything after it (report, eval, sweeps).

Training writes these files; `preftune report RUN_DIR` and every other reader use only them,
never a live trainer. Names live here so writers and readers cannot drift apart.

    config.yaml                 the resolved run config
    run.json                    identity: method, config hash, data fingerprint, preftune version; also status,
                                timing, peak RSS, `precision` (base dtype) and `memory` (checkpointing decision)
    data_report.txt             what loading kept, skipped and truncated
    metrics.jsonl               one row per logged optimiser step ({"step", "time", ...}), and one per
                                evaluation (its keys start with "eval/")
    alerts.jsonl                one row per alert ({"step", "time", "kind", "message", ...details})
    evaluations/step-N.jsonl    per-example validation results of the evaluation after step N
                                (step 0 = before training), one JSON object per example:
                                  example          index in the validation set
                                  origin           "file:line" of the record
                                  prompt_tokens    int
                                  answer_tokens    [int, ...]   one per answer (pairs: chosen, rejected;
                                                                unpaired: the completion)
                                  policy_logps     [float, ...] summed answer log-probs under the policy
                                  reference_logps  [float, ...] the same under the reference, or null
                                  labels           [bool, ...]  unpaired data only
                                  loss, and the method's per-example metrics ("rewards/margins", ...)
    controllers.json            every controller's final state_dict(), by controller name
    probes.json                 with `probes:` set: each probe's log-probs under the reference and the trained
                                policy, and greedy before/after answers to a few held-out probe prompts
                                (preftune.eval.probes.ProbeTable.to_json)
    checkpoints/step-N/         resumable checkpoints (preftune.train.checkpoint)
    final/adapter/, final/merged/, final/<controller files>
    plots/*.png, summary.md, report.html
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preftune.atomic import atomic_write_text

CONFIG = "config.yaml"
IDENTITY = "run.json"
DATA_REPORT = "data_report.txt"
DATA_AUDIT = "data_audit.json"
METRICS = "metrics.jsonl"
ALERTS = "alerts.jsonl"
EVALUATIONS = "evaluations"
CONTROLLERS = "controllers.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
PLOTS = "plots"
SUMMARY = "summary.md"
HTML_REPORT = "report.html"

EVAL_PREFIX = "eval/"
_EVALUATION_FILE = re.compile(r"^step-(\d+)\.jsonl$")


def evaluation_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EVALUATIONS / f"step-{step}.jsonl"


def write_evaluation(run_dir: Path, step: int, rows: list[dict[str, Any]]) -> Path:
    """Per-example rows of one evaluation, one JSON object per line, written atomically."""
    path = evaluation_path(run_dir, step)
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of `path` ([] when it does not exist); a torn last line (a crash mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def evaluation_steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / EVALUATIONS
    if not folder.is_dir():
        return []
    return sorted(int(match.group(1)) for p in folder.iterdir() if (match := _EVALUATION_FILE.match(p.name)))


@dataclass
class RunRecords:
    """Everything a finished (or interrupted) run folder says, read from its files alone."""

    run_dir: Path
    config: dict[str, Any]
    identity: dict[str, Any]
    metrics: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    evaluations: dict[int, list[dict[str, Any]]]  # step -> per-example rows
    controllers: dict[str, Any]
    data_report: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        """Logged optimiser steps (rows without eval/ keys)."""
        return [row for row in self.metrics if not any(key.startswith(EVAL_PREFIX) for key in row)]

    @property
    def eval_rows(self) -> list[dict[str, Any]]:
        """Evaluation summaries, in step order."""
        return [row for row in self.metrics if any(key.startswith(EVAL_PREFIX) for key in row)]

    @property
    def method(self) -> str:
        return str(self.identity.get("method") or self.config.get("method", {}).get("loss_type", "?"))

    def first_and_last_evaluation(self) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        if not self.evaluations:
            return None, None
        steps = sorted(self.evaluations)
        return self.evaluations[steps[0]], self.evaluations[steps[-1]]


def read_run(run_dir: str | Path) -> RunRecords:
    """Read a run folder; raises FileNotFoundError when it holds no config.yaml (not a preftune run)."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a preftune run folder (no {CONFIG})")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    identity_path = run_dir / IDENTITY
    identity = json.loads(identity_path.read_text(encoding="utf-8")) if identity_path.is_file() else {}
    controllers_path = run_dir / CONTROLLERS
    controllers = json.loads(controllers_path.read_text(encoding="utf-8")) if controllers_path.is_file() else {}
    data_report_path = run_dir / DATA_REPORT
    return RunRecords(
        run_dir=run_dir,
        config=config,
        identity=identity,
        metrics=read_jsonl(run_dir / METRICS),
        alerts=read_jsonl(run_dir / ALERTS),
        evaluations={step: read_jsonl(evaluation_path(run_dir, step)) for step in evaluation_steps(run_dir)},
        controllers=controllers,
        data_report=data_report_path.read_text(encoding="utf-8") if data_report_path.is_file() else "",
    )
