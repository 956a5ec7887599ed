"""Atomic writes: a reader (or a resumed run) sees the old file/folder or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; a published folder follows the umask
        yield staging
        _fsync_tree(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / "old")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
        _fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


STAGING_MARK = ".tmp-"


def _fsync_tree(folder: Path) -> None:
    """Flush every file (and folder entry) under `folder` to disk, so the rename publishes complete files,
    and give them the modes the umask asks for (libraries that write through temporary files leave 0600)."""
    umask = _umask()
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            os.chmod(path, 0o777 & ~umask)
            _fsync_directory(path)
    _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def is_staging_name(name: str) -> bool:
    """Whether `name` is an atomic write's staging or replaced copy (`.<name>.tmp-*`, `.<name>.old-*`)."""
    return name.startswith(".") and (STAGING_MARK in name or ".old-" in name)


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove staging folders and files a killed atomic write left in `folder` (`.<name>.tmp-*`, `.<name>.old-*`)."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if is_staging_name(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a staging path beside `path` to write a file to; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}{STAGING_MARK}", dir=path.parent)
    os.close(descriptor)
    staging = Path(name)
    try:
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes 0600; published files follow the umask
        yield staging
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
        _fsync_directory(path.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as staging:
        staging.write_bytes(data)


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
