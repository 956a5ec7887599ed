"""The run folder's life cycle: claim it, give it an identity, roll its records back for a resume.

A run folder is one run's: `run.json` names the run (resolved config hash, data fingerprint), every
checkpoint carries the same identity, and resuming a checkpoint of another run is refused. A
folder that holds files but no `run.json` is not a run and is never written into unless
`overwrite_output_dir` says so; overwriting removes only what preftune writes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

from preftune import runfolder
from preftune.atomic import atomic_write_json, atomic_write_text, is_staging_name, remove_stale_staging
from preftune.config import RunConfig, dump_config
from preftune.errors import CheckpointError, PreftuneError

# Settings that may differ between a run and its resumption: where it lives and how it was started.
_NOT_IDENTITY = ("output_dir", "resume_from", "overwrite_output_dir")
# Names of everything preftune writes into a run folder (overwrite removes these and nothing else).
OWN_NAMES = (
    runfolder.CONFIG, runfolder.IDENTITY, runfolder.DATA_REPORT, runfolder.METRICS, runfolder.ALERTS,
    runfolder.EVALUATIONS, runfolder.CONTROLLERS, runfolder.CHECKPOINTS, runfolder.FINAL, runfolder.PLOTS,
    runfolder.SUMMARY, runfolder.HTML_REPORT, "tensorboard", runfolder.DATA_AUDIT, "probes.json",
)


def config_hash(config: RunConfig) -> str:
    resolved = config.model_dump(mode="json")
    for key in _NOT_IDENTITY:
        resolved.pop(key, None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(examples: list) -> str:
    """A hash of the tokenised examples in order (prompt and answer ids, labels)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt_ids, [list(ids) for ids in example.answer_ids], example.labels]).encode())
    return digest.hexdigest()[:16]


def run_identity(config: RunConfig, train: list, validation: list) -> dict[str, Any]:
    return {
        "method": config.method_spec.name,
        "config_hash": config_hash(config),
        "data_fingerprint": f"{data_fingerprint(train)}-{data_fingerprint(validation)}",
        "preftune_version": importlib.metadata.version("preftune"),
    }


def check_resumable(identity: dict[str, Any], saved: dict[str, Any] | None, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint written by a different run (config or data)."""
    if saved is None:
        raise CheckpointError(f"checkpoint {checkpoint} carries no run identity (written by an older preftune?); start a new run")
    differences = [
        f"{key}: checkpoint {saved.get(key)} ≠ this run {identity[key]}"
        for key in ("config_hash", "data_fingerprint") if saved.get(key) != identity[key]
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {checkpoint} belongs to another run ({'; '.join(differences)}): the config or the data changed. "
            "Resume with the config and data it was written with, or start a new run in another output_dir "
            "(or overwrite_output_dir: true to replace it)"
        )


def _entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []


def _refuse_occupied(run_dir: Path, config: RunConfig, entries: list[str]) -> None:
    """A non-empty folder is refused for a fresh run unless `overwrite_output_dir`: a run (resume it) or the user's files."""
    if config.overwrite_output_dir:
        return
    if (run_dir / runfolder.IDENTITY).is_file() or (run_dir / runfolder.METRICS).is_file():
        raise PreftuneError(
            f"{run_dir} already holds a run. Resume it with `resume_from: latest`, pick another "
            "output_dir, or set overwrite_output_dir: true."
        )
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise PreftuneError(
        f"output_dir {run_dir} is not empty and is not a preftune run (it holds {shown}); preftune will not "
        "write among your files. Pick an empty or new folder, or set overwrite_output_dir: true "
        "(which replaces only the files preftune writes)"
    )


def check_output_dir(config: RunConfig) -> None:
    """Refuse an `output_dir` that `claim` would refuse, without creating or deleting anything.

    Called before the model and data load, so a bad path costs seconds, not the load: the folder
    itself if it exists, else its nearest existing ancestor, must be a folder this process may
    create entries in (`claim` still tries a real write later, which catches what `os.access`
    cannot see, such as a read-only mount), and a fresh run (no `resume_from`) is refused a
    non-empty folder as `claim` refuses it.
    """
    run_dir = Path(config.output_dir)
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == run_dir else f" (its parent {existing} is a file)"
        raise PreftuneError(f"output_dir {run_dir} cannot be a folder{where}: pick another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == run_dir else f" (its nearest existing parent {existing} is not writable)"
        raise PreftuneError(
            f"cannot write into output_dir {run_dir}: permission denied{where}. Pick a folder you can write to, "
            "or fix its permissions"
        )
    entries = [name for name in _entries(run_dir) if not is_staging_name(name)]  # claim removes those
    if entries and config.resume_from is None:
        _refuse_occupied(run_dir, config, entries)


def claim(run_dir: Path, config: RunConfig, *, resuming: bool) -> None:
    """Make `run_dir` this run's, or refuse with what to do instead. Main process only."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PreftuneError(f"output_dir {run_dir} is a file, not a folder")
    if run_dir.is_dir():
        remove_stale_staging(run_dir / runfolder.CHECKPOINTS)
        remove_stale_staging(run_dir / runfolder.FINAL)
        remove_stale_staging(run_dir)
    entries = _entries(run_dir)
    if entries and not resuming:
        _refuse_occupied(run_dir, config, entries)
        for name in OWN_NAMES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PreftuneError(f"cannot create output_dir {run_dir}: {error.strerror}") from None
    probe = run_dir / ".preftune-write-check"
    try:
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise PreftuneError(f"cannot write into output_dir {run_dir}: {error.strerror}") from None


def write_start(
    run_dir: Path, config: RunConfig, identity: dict[str, Any], data_summary: str, data_evidence: dict[str, Any] | None = None
) -> None:
    """config.yaml, data_report.txt (the data summary), data_audit.json (the data's audit/mix/balance, when given), run.json."""
    atomic_write_text(run_dir / runfolder.CONFIG, dump_config(config))
    atomic_write_text(run_dir / runfolder.DATA_REPORT, data_summary + "\n")
    if data_evidence:
        atomic_write_json(run_dir / runfolder.DATA_AUDIT, data_evidence)
    atomic_write_json(run_dir / runfolder.IDENTITY, {**identity, "status": "running"})


def update_identity(run_dir: Path, **values: Any) -> None:
    path = run_dir / runfolder.IDENTITY
    current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    atomic_write_json(path, {**current, **values})


def roll_back(run_dir: Path, step: int, rows: dict[str, int] | None = None) -> None:
    """Drop every record written after the checkpoint at `step` that a resume or an epoch restart starts
    from, so the folder ends up as an uninterrupted run's would.

    `rows` (kept in checkpoints since epoch restarts) are the numbers of lines metrics.jsonl and
    alerts.jsonl held when the checkpoint was written: the files are cut there, which also drops rows
    written after it with the same step (an epoch start's λ line). Without them (older checkpoints)
    the rows after `step` are dropped. Evaluations after `step` are removed either way.
    """
    for name in (runfolder.METRICS, runfolder.ALERTS):
        path = run_dir / name
        if not path.is_file():
            continue
        if rows is not None and name in rows:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[: rows[name]]
            atomic_write_text(path, "".join(lines))
        else:
            kept = [row for row in runfolder.read_jsonl(path) if row.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    for later in runfolder.evaluation_steps(run_dir):
        if later > step:
            runfolder.evaluation_path(run_dir, later).unlink()
