"""Read raw records from JSONL, JSON and Parquet files, each tagged with where it came from.

- JSONL: one JSON value per line; blank lines are ignored; origins are `path:line`.
- JSON: one array of records, or an object holding the array under `data`, `train`, `records`,
  `examples` or `rows` (or under its only list-valued key). Records are numbered by the line they
  start on when each starts on its own line (a pretty-printed array), else `path:record N`.
- Parquet: rows, `path:record N`.

A `.json` file that is really JSON Lines, and a `.jsonl` file that is really one JSON array, are
read as what they are. A file that cannot be read or parsed at all (missing, not UTF-8, bad JSON,
not Parquet) is a `DataError`; whether a decoded record has the right fields is the formats' business.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from preftune.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
RECORD_LIST_KEYS = ("data", "train", "records", "examples", "rows")
JSON_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class RawRecord:
    """One decoded record. `number` is the 1-based line (`is_line`) or record index."""

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
        return _read_json(path)
    return _numbered(_read_parquet(path), path)


def _read_jsonl(path: Path, *, may_be_json: bool = True) -> Iterator[RawRecord]:
    # Binary lines decoded one by one, so an encoding error names its exact line.
    with _open_binary(path) as lines:
        first = True
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
                if may_be_json and first and line.lstrip().startswith("["):
                    # A JSON array in a .jsonl file (often pretty-printed): read it as one document.
                    yield from _read_json(path, may_be_jsonl=False)
                    return
                hint = " (JSONL needs one whole record per line)" if first and line.strip() == "{" else ""
                raise DataError(f"not valid JSON: {error.msg} (column {error.colno}){hint}", path=str(path), line=number) from None
            first = False
            yield RawRecord(value, str(path), number, is_line=True)


def _read_json(path: Path, *, may_be_jsonl: bool = True) -> Iterator[RawRecord]:
    with _open_binary(path) as file:
        content = file.read()
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8 text", path=str(path)) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if may_be_jsonl and error.msg == "Extra data":  # several values one after another: JSON Lines named .json
            yield from _read_jsonl(path, may_be_json=False)
            return
        raise DataError(f"not valid JSON: {error.msg}", path=str(path), line=error.lineno) from None
    key = _record_list_key(document, path)
    values = document if key is None else document[key]
    lines = _element_lines(text, key)
    on_own_lines = len(set(lines)) == len(lines)
    for index, value in enumerate(values):
        if on_own_lines:
            yield RawRecord(value, str(path), lines[index], is_line=True)
        else:
            yield RawRecord(value, str(path), index + 1, is_line=False)


def _record_list_key(document: Any, path: Path) -> str | None:
    """None for a top-level array, else the key of the object that holds the records."""
    if isinstance(document, list):
        return None
    if isinstance(document, dict):
        for key in RECORD_LIST_KEYS:
            if isinstance(document.get(key), list):
                return key
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
        found = f"; it has keys {sorted(document)[:10]}" if document else ""
        raise DataError(
            f"a .json data file must hold a list of records, or an object with the list under one of "
            f"{', '.join(RECORD_LIST_KEYS)}{found}",
            path=str(path),
        )
    raise DataError(f"a .json data file must hold a list of records, got a {type(document).__name__}", path=str(path))


def _element_lines(text: str, key: str | None) -> list[int]:
    """The 1-based line each element of the record array starts on (the text is valid JSON)."""
    decoder = json.JSONDecoder()
    index = _skip_whitespace(text, 0)
    if key is not None:  # walk the top-level object to the value of `key` (the last one, like json.loads)
        start = None
        index = _skip_whitespace(text, index + 1)
        while text[index] != "}":
            name, index = decoder.raw_decode(text, index)
            index = _skip_whitespace(text, _skip_whitespace(text, index) + 1)  # past ":"
            if name == key:
                start = index
            _, index = decoder.raw_decode(text, index)
            index = _skip_whitespace(text, index)
            if text[index] == ",":
                index = _skip_whitespace(text, index + 1)
        index = start
    lines, line, counted_to = [], 1, 0
    index = _skip_whitespace(text, index + 1)  # past "["
    while text[index] != "]":
        line += text.count("\n", counted_to, index)
        counted_to = index
        lines.append(line)
        _, index = decoder.raw_decode(text, index)
        index = _skip_whitespace(text, index)
        if text[index] == ",":
            index = _skip_whitespace(text, index + 1)
    return lines


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in JSON_WHITESPACE:
        index += 1
    return index


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
