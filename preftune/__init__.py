"""preftune: align causal language models from preference data, and prove it worked."""

from preftune.config import RunConfig, load_config
from preftune.errors import ConfigError, DataError, PreftuneError

__version__ = "0.1.0"


def train(config: RunConfig):
    """Train, export and report a run; see `preftune.run.train`."""
    from preftune.run import train as _train

    return _train(config)


__all__ = ["ConfigError", "DataError", "PreftuneError", "RunConfig", "load_config", "train", "__version__"]
