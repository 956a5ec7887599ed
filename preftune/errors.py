"""Errors a user can cause. The CLI prints these without a traceback."""

from __future__ import annotations


class PreftuneError(Exception):
    """Base class for user-facing errors: the message says what is wrong and how to fix it."""


class ConfigError(PreftuneError):
    """An invalid configuration key or value."""


class DataError(PreftuneError):
    """A bad record in a data file. Names the file, the line (1-based) and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        self.path = path
        self.line = line
        self.field = field
        where = ":".join(str(part) for part in (path, line) if part is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field '{field}')" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")


class ModelError(PreftuneError):
    """A model that cannot be found, loaded or exported."""


class CheckpointError(PreftuneError):
    """A checkpoint that is missing, incomplete or does not match the run."""


class TrainingInterrupted(PreftuneError):
    """Ctrl-C or SIGTERM: the run stopped at a step boundary after writing a checkpoint."""
