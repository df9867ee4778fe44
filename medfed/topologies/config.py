"""Options of the peer-to-peer paradigms (``paradigm: cyclic`` and ``paradigm: gossip``).

Kept beside the topologies rather than in ``medfed.config`` so the enums and their meaning live in
one place; ``RunConfig.peer`` holds one of these. There is no separate seed: the visit orders and
gossip draws derive from the run's ``seed`` (``medfed.seeding``), so a run is reproducible from
its config alone.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from medfed.algorithms.fedisca_synthesis import FedISCAOptions
from medfed.topologies.cyclic import CyclicOrder
from medfed.topologies.gossip import PullPolicy


class PeerConfig(BaseModel):
    """How peers exchange models. ``federation.rounds`` counts cycles (cyclic) or rounds of
    ``num_sites`` gossip steps (gossip): either way a round costs one local training per site
    (in expectation for gossip), the same as a full-participation FedAvg round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    order: CyclicOrder = Field(
        CyclicOrder.FIXED,
        description="cyclic: visit the sites in the federation's order every cycle (fixed) or in "
        "a new random order each cycle (shuffled)",
    )
    pull: PullPolicy = Field(
        PullPolicy.NEWER,
        description="gossip: pull only peers whose model changed since the last merge (newer, "
        "BrainTorrent) or every peer at every step (all)",
    )


class OneShotConfig(BaseModel):
    """``paradigm: one_shot``: the distillation's settings and, optionally, per-site networks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fedisca: FedISCAOptions = Field(
        default_factory=lambda: FedISCAOptions.preset("small"),
        description="synthesis and distillation (published small-image defaults)",
    )
    teacher_models: dict[str, str] = Field(
        default_factory=dict,
        description="site -> model name for heterogeneous teachers; default: the run's model",
    )
