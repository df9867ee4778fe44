"""Cyclic weight transfer (Chang et al. 2018): one model visits the sites in turn.

There is no aggregator: the model trains for E local epochs at a site and is handed to the next.
This module is the pure part -- which site trains when -- so the order can be tested without a
model; ``medfed.peer`` runs the loop. One round of a cyclic run is one full cycle (every site
once), so ``federation.rounds`` counts cycles and a round costs the same local training as a
full-participation FedAvg round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfed.types import StrEnum


class CyclicOrder(StrEnum):
    """FIXED repeats the federation's site order; SHUFFLED draws a new order every cycle.

    Shuffling matters because the last site of a fixed cycle always has the last word on the
    model (catastrophic forgetting of the earlier sites' data is then systematic, not random).
    """

    FIXED = "fixed"
    SHUFFLED = "shuffled"


def visit_order(
    sites: Sequence[str], cycle: int, *, order: CyclicOrder, rng: np.random.Generator
) -> list[str]:
    """The sites in the order the model visits them during ``cycle``.

    ``rng`` must be derived from (seed, cycle) by the caller, so that a resumed run draws the same
    order as an uninterrupted one; it is not touched for a fixed order.
    """
    if cycle < 0:
        raise ValueError(f"cycle must be >= 0, got {cycle}")
    if not sites:
        raise ValueError("a cycle needs at least one site")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names must be unique, got {list(sites)}")
    if order is CyclicOrder.FIXED:
        return list(sites)
    return [sites[i] for i in rng.permutation(len(sites))]
