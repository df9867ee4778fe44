"""Federated algorithms: each module holds a client half and a pure server half.

Importing this package registers every algorithm in ``STRATEGIES``.
"""

from medfed.algorithms import fedavg, fedbn, fedopt, fedprox, robust, scaffold  # noqa: F401
from medfed.algorithms.base import (
    Algorithm,
    AlgorithmBase,
    FederationContext,
    LocalResult,
    LocalTask,
)
from medfed.algorithms.registry import STRATEGIES, create_strategy

__all__ = [
    "STRATEGIES",
    "Algorithm",
    "AlgorithmBase",
    "FederationContext",
    "LocalResult",
    "LocalTask",
    "create_strategy",
]
