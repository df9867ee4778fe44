"""Gossip bookkeeping: version vectors, who is pulled, example-weighted merging (pure, tiny)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from medfed.seeding import numpy_rng
from medfed.topologies.gossip import (
    GossipState,
    PullPolicy,
    VersionVector,
    bump,
    choose_site,
    consensus,
    merge,
    pull,
    state_from_tensors,
    state_to_tensors,
)

SITES = ["a", "b", "c"]


def test_version_vector_is_an_immutable_order_free_mapping():
    v = VersionVector.of({"b": 2, "a": 1})
    assert dict(v) == {"a": 1, "b": 2} and list(v) == ["a", "b"]
    assert v == VersionVector.of([("a", 1), ("b", 2)]) and hash(v) == hash(VersionVector.of(v))
    w = v.with_version("a", 5)
    assert w["a"] == 5 and v["a"] == 1  # a new vector; the old one is unchanged
    with pytest.raises(AttributeError):
        v.entries = ()  # type: ignore[misc]
    with pytest.raises(KeyError, match="unknown site"):
        v.with_version("z", 1)
    with pytest.raises(ValueError, match="non-negative"):
        VersionVector.of({"a": -1})


def test_pull_takes_exactly_the_peers_that_trained_since_the_last_merge():
    s = GossipState.start(SITES)
    assert [pull(s, x) for x in SITES] == [[], [], []]  # everyone holds the initial model
    s = bump(s, "a", [])  # a trained on its own
    assert s.versions["a"] == 1 and s.merged["a"] == VersionVector.zeros(SITES)
    assert pull(s, "a") == [] and pull(s, "b") == ["a"] and pull(s, "c") == ["a"]
    s = bump(s, "b", ["a"])  # b merged a's version 1, trained
    assert s.versions == VersionVector.of({"a": 1, "b": 1, "c": 0})
    assert s.merged["b"] == VersionVector.of({"a": 1, "b": 0, "c": 0})
    assert pull(s, "b") == []  # a has not changed since b merged it
    assert pull(s, "a") == ["b"] and pull(s, "c") == ["a", "b"]
    s = bump(s, "a", ["b"])
    assert pull(s, "b") == ["a"]  # a changed again
    assert pull(s, "c", policy=PullPolicy.ALL) == ["a", "b"]
    assert pull(GossipState.start(SITES), "a", policy=PullPolicy.ALL) == ["b", "c"]


def test_bump_rejects_pulling_oneself():
    with pytest.raises(ValueError, match="own model"):
        bump(GossipState.start(SITES), "a", ["a"])


@given(st.lists(st.tuples(st.sampled_from(SITES), st.booleans()), max_size=30))
def test_pull_never_returns_self_or_a_stale_peer(steps):
    s = GossipState.start(SITES)
    for site, accepted in steps:
        peers = pull(s, site)
        assert site not in peers and peers == sorted(peers)
        for p in SITES:
            assert s.merged[site][p] <= s.versions[p]  # nobody merged a version from the future
            assert (p in peers) == (p != site and s.versions[p] > s.merged[site][p])
        if accepted:  # a rejected step leaves the state as it was
            before = s.versions[site]
            s = bump(s, site, peers)
            assert s.versions[site] == before + 1
            assert all(s.merged[site][p] == s.versions[p] for p in peers)


def test_merge_is_the_example_weighted_mean_in_the_owns_dtype():
    own = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(4)}
    out = merge(own, {"b": b}, own_weight=1, weights={"b": 3})
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 3  # (1 + 12) / 4 = 3.25 -> 3
    assert merge(own, {}, own_weight=1, weights={}) == own  # nothing pulled: own model


@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=5),
    st.lists(st.integers(1, 500), min_size=1, max_size=4),
)
def test_merging_identical_models_is_identity_in_any_order(values, counts):
    params = {"w": torch.tensor(values, dtype=torch.float32)}
    names = [f"p{i}" for i in range(len(counts))]
    weights = dict(zip(names, map(float, counts), strict=True))
    pulled = {n: {"w": params["w"].clone()} for n in names}
    out = merge(params, pulled, own_weight=7.0, weights=weights)
    assert torch.equal(out["w"], params["w"])
    reordered = merge(params, dict(reversed(pulled.items())), own_weight=7.0, weights=weights)
    assert torch.equal(reordered["w"], out["w"])


def test_consensus_weights_models_by_examples():
    models = {"a": {"w": torch.tensor([0.0])}, "b": {"w": torch.tensor([4.0])}}
    assert torch.equal(consensus(models, {"a": 3.0, "b": 1.0})["w"], torch.tensor([1.0]))


def test_state_survives_a_round_trip_through_tensors():
    s = bump(bump(GossipState.start(SITES), "c", []), "a", ["c"])
    tensors = state_to_tensors(s)
    assert tensors["a"]["merged"].tolist() == [0, 0, 1]
    assert state_from_tensors(tensors) == s


def test_choose_site_is_reproducible_from_the_step():
    picks = [choose_site(SITES, numpy_rng(0, "gossip", k)) for k in range(30)]
    assert picks == [choose_site(SITES, numpy_rng(0, "gossip", k)) for k in range(30)]
    assert set(picks) == set(SITES)
