"""FedAvg (McMahan et al. 2017): local SGD at each site, server takes the example-weighted mean.

Every key of the state dict is averaged, BatchNorm running statistics and
``num_batches_tracked`` included (the latter rounded back to an integer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pydantic import BaseModel, ConfigDict

from medfed.algorithms.aggregate import as_weights, merge, prepare_updates, weighted_mean
from medfed.algorithms.base import AlgorithmBase
from medfed.algorithms.registry import STRATEGIES
from medfed.types import Params, StrategyState, Update


class FedAvgOptions(BaseModel):
    """FedAvg has no options; the model exists so that any option given is rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def fedavg_aggregate(
    global_params: Params, updates: Sequence[Update], expected_keys: frozenset[str] | None
) -> Params:
    """Example-weighted mean of the uploaded keys; keys not uploaded keep the global value."""
    ups = prepare_updates(global_params, updates, expected_keys)
    mean = weighted_mean(
        [as_weights(u, global_params) for u in ups],
        [u.num_examples for u in ups],
        like=global_params,
    )
    return merge(global_params, mean)


class FedAvg(AlgorithmBase):
    name = "fedavg"
    preserves_consensus = True

    def __init__(self, options: FedAvgOptions | None = None) -> None:
        self.options = options or FedAvgOptions()

    def aggregate(
        self,
        global_params: Params,
        updates: Sequence[Update],
        state: StrategyState,
        *,
        round_idx: int,
    ) -> tuple[Params, StrategyState]:
        new = fedavg_aggregate(global_params, updates, self.uploaded_keys())
        return new, replace(state, round=state.round + 1)


STRATEGIES.register("fedavg", options=FedAvgOptions)(FedAvg)
