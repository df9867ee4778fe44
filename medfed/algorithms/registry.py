"""The strategy registry: every algorithm module registers its name(s) and options model here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from medfed.algorithms.base import Algorithm
from medfed.registry import Registry

STRATEGIES: Registry[Algorithm] = Registry("strategy")


def create_strategy(name: str, options: BaseModel | Mapping[str, Any] | None = None) -> Algorithm:
    """Build a registered strategy; unknown names and unknown/invalid options raise."""
    import medfed.algorithms  # noqa: F401  (importing the package registers every algorithm)

    return STRATEGIES.create(name, options)
