"""medfed: federated learning for medical images.

The public entry points; everything else is reachable through its module
(``medfed.algorithms``, ``medfed.data.synthetic.ultrasound``, ``medfed.models.factory``...).
"""

from medfed.config import ConfigError, RunConfig, build_config, load_config
from medfed.engine import FederationError, RunResult, run

__all__ = [
    "ConfigError",
    "FederationError",
    "RunConfig",
    "RunResult",
    "build_config",
    "load_config",
    "run",
]
__version__ = "0.1.0"
