"""FedAvg (McMahan et al. 2017): local SGD at each site, server takes the example-weighted mean.

Every key of the state dict is averaged, BatchNorm running statistics and
``num_batches_tracked`` included (the latter rounded back to an integer).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from medfed.algorithms.base import AlgorithmBase
from medfed.algorithms.registry import STRATEGIES


class FedAvgOptions(BaseModel):
    """FedAvg has no options; the model exists so that any option given is rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FedAvg(AlgorithmBase):
    """Client: plain local training. Server: ``AlgorithmBase.aggregate``, the example-weighted
    mean (``aggregate.fedavg_aggregate``)."""

    name = "fedavg"
    preserves_consensus = True

    def __init__(self, options: FedAvgOptions | None = None) -> None:
        self.options = options or FedAvgOptions()


STRATEGIES.register("fedavg", options=FedAvgOptions)(FedAvg)
