"""Core value types shared by every layer.

Everything that crosses the site boundary is one of these: parameters, counts and metrics.
Nothing here can carry an image, a mask or a patient identifier.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - exercised only on 3.10

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


Params = dict[str, torch.Tensor]
"""A model's state (parameters and buffers) keyed by ``state_dict`` name."""

Buffers = Mapping[str, Params]
"""Named groups of tensors, e.g. ``{"m": ..., "v": ...}`` for FedAdam's moments."""


class ParamKind(StrEnum):
    WEIGHTS = "weights"
    DELTA = "delta"


class Task(StrEnum):
    """What the network predicts: one label per image, or one label per pixel (voxel)."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


class Paradigm(StrEnum):
    FEDERATED = "federated"
    CENTRALIZED = "centralized"
    LOCAL = "local"
    CYCLIC = "cyclic"  # peer-to-peer: one model visits the sites in turn (medfed.peer)
    GOSSIP = "gossip"  # peer-to-peer: BrainTorrent-style pull-merge-train (medfed.peer)
    ONE_SHOT = "one_shot"  # each site uploads once; the server distills (medfed.one_shot)


@dataclass(frozen=True)
class Update:
    """What one site sends back after local training."""

    site: str
    params: Params
    kind: ParamKind
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Buffers = field(default_factory=dict)


@dataclass(frozen=True)
class StrategyState:
    """Server-side state of a strategy; tensors live in ``buffers`` so checkpoints stay safetensors."""

    round: int = 0
    buffers: Buffers = field(default_factory=dict)
    scalars: Mapping[str, float] = field(default_factory=dict)


ClientState = Buffers
"""State an algorithm keeps *at a site* between rounds (FedBN's local BN, SCAFFOLD's c_i). Never sent."""


def params_nbytes(params: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def clone_params(params: Mapping[str, torch.Tensor]) -> Params:
    return {k: v.detach().clone() for k, v in params.items()}
