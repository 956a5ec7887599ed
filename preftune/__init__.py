"""preftune: align causal language models from preference data, and prove it worked."""

from __future__ import annotations

import importlib

from preftune.errors import ConfigError, DataError, PreftuneError

__version__ = "0.1.0"

# The public API, imported on first use: `import preftune` (and the CLI's start) stays light, and
# environment settings the CLI makes before loading torch/transformers still take effect.
_LAZY = {"RunConfig": "preftune.config", "load_config": "preftune.config", "train": "preftune.run"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'preftune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    # Bind it here: importing preftune.run imports the subpackage preftune.train, which would else shadow `train`.
    globals()[name] = value
    return value


__all__ = ["ConfigError", "DataError", "PreftuneError", "RunConfig", "load_config", "train", "__version__"]
