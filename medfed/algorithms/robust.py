"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum / multi-Krum.

For federations where a site may send a corrupted update (a bug, a broken preprocessing
pipeline, or an attacker). Clients train plainly (FedAvg's client half); only the server rule
changes. The rules run on full weights (DELTA updates are added to the global first -- all three
rules are translation-equivariant, so this equals aggregating the deltas) over every key of the
state dict, BatchNorm statistics included: a corrupted running variance is as harmful as a
corrupted weight. ``num_examples`` is ignored on purpose: a self-reported count is exactly what an
attacker would inflate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from medfed.algorithms.aggregate import (
    as_weights,
    coordinate_median,
    krum_select,
    merge,
    prepare_updates,
    trimmed_mean,
)
from medfed.algorithms.base import AlgorithmBase
from medfed.algorithms.registry import STRATEGIES
from medfed.types import Params, StrategyState, Update


class MedianOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrimmedMeanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="cut floor(trim_fraction * n) values at each end"
    )


class KrumOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_malicious: int = Field(
        0, ge=0, description="f: tolerated attackers; scores use the n - f - 2 closest others"
    )
    num_selected: int = Field(1, ge=1, description="m: 1 = Krum, > 1 = multi-Krum (uniform mean)")


class _RobustBase(AlgorithmBase):
    preserves_consensus = True

    def _rule(self, weights: list[Params], global_params: Params) -> Params:
        raise NotImplementedError

    def aggregate(
        self,
        global_params: Params,
        updates: Sequence[Update],
        state: StrategyState,
        *,
        round_idx: int,
    ) -> tuple[Params, StrategyState]:
        ups = prepare_updates(global_params, updates, self.uploaded_keys())
        agg = self._rule([as_weights(u, global_params) for u in ups], global_params)
        return merge(global_params, agg), replace(state, round=state.round + 1)


class Median(_RobustBase):
    name = "median"

    def __init__(self, options: MedianOptions | None = None) -> None:
        self.options = options or MedianOptions()

    def _rule(self, weights: list[Params], global_params: Params) -> Params:
        return coordinate_median(weights, like=global_params)


class TrimmedMean(_RobustBase):
    name = "trimmed_mean"

    def __init__(self, options: TrimmedMeanOptions | None = None) -> None:
        self.options = options or TrimmedMeanOptions()

    def _rule(self, weights: list[Params], global_params: Params) -> Params:
        return trimmed_mean(weights, trim_fraction=self.options.trim_fraction, like=global_params)


class Krum(_RobustBase):
    """Krum's guarantee needs n >= 2f + 3 updates; smaller rounds still aggregate (as in Flower)
    using at least one neighbour per score. Fewer than ``num_selected`` updates is an error."""

    name = "krum"

    def __init__(self, options: KrumOptions | None = None) -> None:
        self.options = options or KrumOptions()

    def _rule(self, weights: list[Params], global_params: Params) -> Params:
        return krum_select(
            weights,
            num_malicious=self.options.num_malicious,
            num_selected=self.options.num_selected,
            like=global_params,
        )


STRATEGIES.register("median", options=MedianOptions)(Median)
STRATEGIES.register("trimmed_mean", options=TrimmedMeanOptions)(TrimmedMean)
STRATEGIES.register("krum", options=KrumOptions)(Krum)
