"""Read raw records from JSONL, JSON and Parquet files, each tagged with where it came from.

A file that cannot be read or parsed at all (missing, not UTF-8, bad JSON, not Parquet) is a
`DataError`; whether a decoded record has the right fields is the formats' business.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from preftune.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class RawRecord:
    """One decoded record. `number` is the 1-based line (JSONL) or record index (JSON, Parquet)."""

    value: Any
    path: str
    number: int
    is_line: bool

    @property
    def source(self) -> str:
        return f"{self.path}:{self.number}" if self.is_line else f"{self.path}:record {self.number}"

    def error(self, message: str, field: str | None = None) -> DataError:
        if self.is_line:
            return DataError(message, path=self.path, line=self.number, field=field)
        return DataError(f"record {self.number}: {message}", path=self.path, field=field)


def read_records(path: str | Path) -> Iterator[RawRecord]:
    """The file's records in order. Checks the path now; JSONL is then streamed, so stopping early reads only what it needs."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported data file type '{suffix or path.name}': use one of {', '.join(SUPPORTED_SUFFIXES)}", path=str(path))
    if not path.is_file():
        raise DataError("data file not found", path=str(path))
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _numbered(_read_json(path), path)
    return _numbered(_read_parquet(path), path)


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    # Binary lines decoded one by one, so an encoding error names its exact line.
    with _open_binary(path) as lines:
        for number, raw_line in enumerate(lines, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("not valid UTF-8 text", path=str(path), line=number) from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"not valid JSON: {error.msg} (column {error.colno})", path=str(path), line=number) from None
            yield RawRecord(value, str(path), number, is_line=True)


def _read_json(path: Path) -> list[Any]:
    with _open_binary(path) as file:
        content = file.read()
    try:
        document = json.loads(content.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8 text", path=str(path)) from None
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON: {error.msg}", path=str(path), line=error.lineno) from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        return document["data"]
    if isinstance(document, list):
        return document
    raise DataError('a .json data file must hold a list of records or {"data": [records]}', path=str(path))


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"not a readable Parquet file: {error}", path=str(path)) from None


def _open_binary(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as error:
        raise DataError(f"cannot read the file: {error.strerror}", path=str(path)) from None


def _numbered(values: list[Any], path: Path) -> Iterator[RawRecord]:
    for number, value in enumerate(values, start=1):
        yield RawRecord(value, str(path), number, is_line=False)
