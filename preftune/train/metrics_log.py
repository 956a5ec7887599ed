"""Where a run's numbers go: metrics.jsonl (one JSON object per logged step), TensorBoard, alerts.jsonl."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from preftune.runfolder import ALERTS, METRICS


class MetricsLog:
    """Append-only JSONL (flushed per line, so a crash loses at most the line being written) + TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, jsonl: bool = True, purge_step: int | None = None):
        """`purge_step`: on resume, TensorBoard drops its events from this step on (the JSONL files are rolled
        back by the trainer before they are opened)."""
        self.run_dir = run_dir
        # Rows in each file, those already there included: a checkpoint keeps them, so a roll-back to it
        # drops exactly what was written after it (even rows that carry the checkpoint's own step).
        self.rows = {name: _count_lines(run_dir / name) for name in (METRICS, ALERTS)}
        self._jsonl = (run_dir / METRICS).open("a", encoding="utf-8") if jsonl else None
        self._alerts = (run_dir / ALERTS).open("a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            self.rows[METRICS] += 1
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)

    def alert(self, step: int, kind: str, message: str, **details: Any) -> dict[str, Any]:
        record = {"step": step, "time": round(time.time(), 3), "kind": kind, "message": message, **details}
        self._alerts.write(json.dumps(record) + "\n")
        self._alerts.flush()
        self.rows[ALERTS] += 1
        return record

    def close(self) -> None:
        for handle in (self._jsonl, self._alerts):
            if handle is not None:
                handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value
