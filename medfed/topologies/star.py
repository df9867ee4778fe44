"""Client-server topology: every round the server samples sites and merges their updates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoundPlan:
    round_idx: int
    participants: tuple[str, ...]


@dataclass(frozen=True)
class StarTopology:
    fraction: float = 1.0
    min_clients: int = 1

    def plan(self, round_idx: int, sites: Sequence[str], rng: np.random.Generator) -> RoundPlan:
        """Sample ``max(min_clients, ceil(fraction * n))`` sites without replacement."""
        if self.min_clients > len(sites):
            raise ValueError(
                f"min_clients={self.min_clients} but the federation has only {len(sites)} sites"
            )
        k = min(len(sites), max(self.min_clients, math.ceil(self.fraction * len(sites))))
        if k == len(sites):
            return RoundPlan(round_idx, tuple(sites))
        chosen = rng.choice(len(sites), size=k, replace=False)
        return RoundPlan(round_idx, tuple(sites[i] for i in sorted(chosen)))
