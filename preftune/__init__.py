"""preftune: align causal language models from preference data, and prove it worked."""

__version__ = "0.1.0"

from preftune.config import RunConfig, load_config  # noqa: E402
from preftune.errors import ConfigError, DataError, PreftuneError  # noqa: E402
from preftune.run import train  # noqa: E402

__all__ = ["ConfigError", "DataError", "PreftuneError", "RunConfig", "load_config", "train", "__version__"]
