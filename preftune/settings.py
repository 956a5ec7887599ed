"""The base of every validated settings section (unknown keys are errors, assignments are checked),
and where preftune keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

CACHE_ENV_VAR = "PREFTUNE_CACHE"


def cache_root() -> Path:
    """Where converted models and cached reference log-probs live; `$PREFTUNE_CACHE` overrides."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "preftune")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
