"""BrainTorrent-style gossip (Roy et al. 2019): every site keeps its own model, no aggregator.

At each step one site, drawn at random, pulls the models of the peers that changed since it last
merged them (their version is newer than the one it recorded), merges them with its own by
example-weighted averaging, trains locally and bumps its own version. The version vectors make the
pull cheap -- a peer that has not trained since is not downloaded again -- and are the only state
besides the models.

Everything here is pure (no I/O, no training) so the bookkeeping can be checked with tiny tensors;
``medfed.peer`` runs the loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

from medfed.algorithms.aggregate import weighted_mean
from medfed.types import Params, StrEnum


class PullPolicy(StrEnum):
    """NEWER: BrainTorrent's rule, pull only peers that trained since the last merge.

    ALL: pull every peer at every step, whether it changed or not -- the "everyone merges
    everything" limit, which on an iid split approaches FedAvg (a sanity check more than a
    protocol: it moves the most bytes).
    """

    NEWER = "newer"
    ALL = "all"


@dataclass(frozen=True)
class VersionVector(Mapping[str, int]):
    """An immutable site -> version mapping; versions count a site's accepted training steps."""

    entries: tuple[tuple[str, int], ...] = ()
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index = dict(self.entries)
        if len(index) != len(self.entries):
            raise ValueError(f"duplicate sites in a version vector: {self.entries}")
        bad = {s: v for s, v in index.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"versions must be non-negative integers, got {bad}")
        # Sorted, so equal vectors compare (and hash) equal whatever order they were built in.
        object.__setattr__(self, "entries", tuple(sorted(index.items())))
        object.__setattr__(self, "_index", MappingProxyType(index))

    @classmethod
    def of(cls, versions: Mapping[str, int] | Iterable[tuple[str, int]]) -> VersionVector:
        items = versions.items() if isinstance(versions, Mapping) else versions
        return cls(tuple((str(s), int(v)) for s, v in items))

    @classmethod
    def zeros(cls, sites: Iterable[str]) -> VersionVector:
        return cls.of((s, 0) for s in sites)

    def with_version(self, site: str, version: int) -> VersionVector:
        if site not in self._index:
            raise KeyError(f"unknown site {site!r}; sites: {list(self._index)}")
        return VersionVector.of({**self._index, site: version})

    def __getitem__(self, site: str) -> int:
        return self._index[site]

    def __iter__(self) -> Iterator[str]:
        return iter(s for s, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class GossipState:
    """Each site's model version, and for each site the peer versions it last merged."""

    versions: VersionVector
    merged: Mapping[str, VersionVector]

    def __post_init__(self) -> None:
        sites = set(self.versions)
        if set(self.merged) != sites or any(set(v) != sites for v in self.merged.values()):
            raise ValueError("every site needs a merged-version vector over all sites")
        object.__setattr__(self, "merged", MappingProxyType(dict(sorted(self.merged.items()))))

    @classmethod
    def start(cls, sites: Sequence[str]) -> GossipState:
        """All sites hold the common initial model: version 0, nothing merged yet."""
        if len(set(sites)) != len(sites) or not sites:
            raise ValueError(f"need unique site names, got {list(sites)}")
        zeros = VersionVector.zeros(sites)
        return cls(zeros, {s: zeros for s in sites})

    @property
    def sites(self) -> list[str]:
        return list(self.versions)


class VersionSlot(StrEnum):
    """Tensor names of a site's version bookkeeping in a checkpoint (``GossipState.to_tensors``)."""

    VERSION = "version"  # tensor([own version])
    MERGED = "merged"  # the peer versions it last merged, in site-name order


def state_to_tensors(state: GossipState) -> dict[str, dict[str, torch.Tensor]]:
    """Per site, its version and merged vector as int64 tensors (checkpoints hold tensors)."""
    return {
        site: {
            VersionSlot.VERSION: torch.tensor([state.versions[site]], dtype=torch.int64),
            VersionSlot.MERGED: torch.tensor(
                [state.merged[site][p] for p in state.sites], dtype=torch.int64
            ),
        }
        for site in state.sites
    }


def state_from_tensors(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> GossipState:
    """The inverse of :func:`state_to_tensors`."""
    order = sorted(tensors)
    versions = VersionVector.of({s: int(tensors[s][VersionSlot.VERSION].item()) for s in order})
    merged = {
        s: VersionVector.of(zip(order, tensors[s][VersionSlot.MERGED].tolist(), strict=True))
        for s in order
    }
    return GossipState(versions, merged)


def pull(state: GossipState, site: str, *, policy: PullPolicy = PullPolicy.NEWER) -> list[str]:
    """The peers ``site`` downloads this step, sorted by name; never ``site`` itself."""
    if site not in state.versions:
        raise KeyError(f"unknown site {site!r}; sites: {state.sites}")
    peers = [p for p in state.versions if p != site]
    if policy is PullPolicy.ALL:
        return peers
    seen = state.merged[site]
    return [p for p in peers if state.versions[p] > seen[p]]


def bump(state: GossipState, site: str, pulled: Iterable[str]) -> GossipState:
    """After ``site`` merged ``pulled`` and trained: its version + 1, those peers recorded."""
    pulled = list(pulled)
    if site in pulled:
        raise ValueError(f"site {site!r} cannot pull its own model")
    seen = state.merged[site]
    for p in pulled:
        seen = seen.with_version(p, state.versions[p])
    versions = state.versions.with_version(site, state.versions[site] + 1)
    return GossipState(versions, {**state.merged, site: seen})


def merge(
    own: Params,
    pulled: Mapping[str, Params],
    *,
    own_weight: float,
    weights: Mapping[str, float],
) -> Params:
    """Example-weighted mean of a site's own model and the models it pulled.

    The peers are taken in name order (own model first), so the result is bit-identical however
    the pulled mapping was built; with nothing pulled the own model comes back unchanged.
    """
    if not pulled:
        return dict(own)
    peers = sorted(pulled)
    return weighted_mean(
        [own, *(pulled[p] for p in peers)],
        [own_weight, *(weights[p] for p in peers)],
        like=own,
    )


def consensus(models: Mapping[str, Params], weights: Mapping[str, float]) -> Params:
    """The example-weighted average of every site's model, in site-name order.

    No site holds it during training; it is what the federation would agree on if it stopped now,
    and what a peer-to-peer run reports as its global model.
    """
    sites = sorted(models)
    if not sites:
        raise ValueError("no models to average")
    return weighted_mean([models[s] for s in sites], [weights[s] for s in sites])


def choose_site(sites: Sequence[str], rng: np.random.Generator) -> str:
    """The site that gossips this step, uniformly at random (``rng`` derived from the step)."""
    if not sites:
        raise ValueError("no sites to choose from")
    return sites[int(rng.integers(len(sites)))]
