"""Checked access to a raw record's fields: the skip signal, required fields, message lists, column renames.

Every check raises `SkipRecord(reason, message, field)`; the loader counts the reason or, with
`skip_invalid=False`, turns it into a `DataError` naming file, line and field.
"""

from __future__ import annotations

import difflib
from typing import Any

from preftune.errors import ConfigError

# preftune's own field names, which `data.columns` maps onto a file's names.
COLUMN_NAMES = ("prompt", "chosen", "rejected", "completion", "label", "messages")
CLOSE_MATCH_CUTOFF = 0.75


class SkipRecord(Exception):
    """A record that cannot become an example; `reason` is what gets counted."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field


def require_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SkipRecord("wrong_type", f"a record must be a JSON object, got {type(value).__name__}")
    return value


def required_field(value: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """`value[name]`, which must be present, not null and of `kind`; a missing one names a likely misspelling."""
    if value.get(name) is None:  # null counts as missing: Parquet fills absent columns with null
        raise SkipRecord("missing_field", f"missing field{misspelling_hint(name, value)}", name)
    if not isinstance(value[name], kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SkipRecord("wrong_type", f"expected {expected}, got {type(value[name]).__name__}", name)
    return value[name]


def misspelling_hint(name: str, value: dict[str, Any]) -> str:
    """`; the record has 'rejectd': misspelled? ...` when a present field is a close match for the missing `name`."""
    others = [key for key in value if isinstance(key, str) and key != name]
    close = difflib.get_close_matches(name, others, n=1, cutoff=CLOSE_MATCH_CUTOFF)
    if not close:
        return ""
    return f"; the record has '{close[0]}': misspelled? rename it to '{name}' or set data.columns: {{{name}: {close[0]}}}"


def message_list(value: dict[str, Any], name: str) -> list[dict[str, str]]:
    """A list of `{"role": str, "content": str}` messages."""
    messages = required_field(value, name, list)
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise SkipRecord("wrong_type", "expected a list of {role, content} messages with string content", name)
    return messages


def check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    """`data.columns` checked: keys are preftune's names (`COLUMN_NAMES`), values the file's field names."""
    columns = dict(columns or {})
    for name, file_name in columns.items():
        if name not in COLUMN_NAMES:
            close = difflib.get_close_matches(str(name), COLUMN_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"data.columns: unknown name '{name}'{hint}; map preftune's names {', '.join(COLUMN_NAMES)} to the file's field names")
        if not isinstance(file_name, str) or not file_name:
            raise ConfigError(f"data.columns.{name}: expected a field name of the file, got {file_name!r}")
    if len(set(columns.values())) != len(columns):
        raise ConfigError(f"data.columns maps two of preftune's names to the same field: {columns}")
    return columns


def rename_columns(value: Any, columns: dict[str, str]) -> Any:
    """The record with the file's fields renamed to preftune's (`columns`: preftune name → file name)."""
    if not columns or not isinstance(value, dict):
        return value
    file_names = set(columns.values())
    renamed = {key: item for key, item in value.items() if key not in file_names and key not in columns}
    renamed.update({name: value[file_name] for name, file_name in columns.items() if file_name in value})
    return renamed
