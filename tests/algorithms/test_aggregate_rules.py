"""The pure aggregation rules: hand-computed cases, then Flower's numpy functions as reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from medfed.algorithms.aggregate import (
    as_weights,
    coordinate_median,
    deltas,
    krum_order,
    krum_scores,
    krum_select,
    merge,
    prepare_updates,
    trimmed_mean,
    weighted_mean,
)
from medfed.types import ParamKind, Update

from ._helpers import to_numpy_list


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def column(*values: float) -> list[dict[str, torch.Tensor]]:
    """One single-coordinate param set per value."""
    return [{"w": t(v)} for v in values]


# --- hand-computed ---


def test_weighted_mean_by_hand() -> None:
    a = {"w": t(1.0, 2.0), "n": torch.tensor(3)}
    b = {"w": t(3.0, 6.0), "n": torch.tensor(4)}
    out = weighted_mean([a, b], [1, 3])
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5; counts (3 + 12)/4 = 3.75 -> rounds to 4
    assert torch.equal(out["w"], t(2.5, 5.0))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 4
    # equal weights: 3.5 rounds half to even -> 4; not truncated to 3
    assert int(weighted_mean([a, b], [1, 1])["n"]) == 4
    assert int(weighted_mean([a, {"w": b["w"], "n": torch.tensor(6)}], [1, 1])["n"]) == 4


def test_weighted_mean_rejects_bad_weights() -> None:
    a = {"w": t(1.0)}
    with pytest.raises(ValueError):
        weighted_mean([a, a], [0, 0])
    with pytest.raises(ValueError):
        weighted_mean([a, a], [1, -1])
    with pytest.raises(ValueError):
        weighted_mean([a], [1, 2])
    with pytest.raises(ValueError):
        weighted_mean([a, {"v": t(1.0)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_mean([a, {"w": t(1.0, 2.0)}], [1, 1])


def test_weighted_mean_keeps_low_precision_dtype_but_accumulates_in_float64() -> None:
    # 1000 ones in bfloat16: a bf16 running sum would stall at 256 (mean 0.256).
    sets = [{"w": torch.ones(1, dtype=torch.bfloat16)}] * 1000
    out = weighted_mean(sets, [1] * 1000)
    assert out["w"].dtype == torch.bfloat16 and float(out["w"]) == 1.0
    like = {"w": torch.zeros(1, dtype=torch.float16)}
    assert weighted_mean([{"w": t(1.0)}], [1], like=like)["w"].dtype == torch.float16


def test_median_odd_and_even_by_hand() -> None:
    assert float(coordinate_median(column(1, 5, 3))["w"]) == 3.0
    assert float(coordinate_median(column(1, 5, 3, 10))["w"]) == 4.0  # (3 + 5) / 2, not 3
    two_d = [{"w": t(1.0, 9.0)}, {"w": t(2.0, 8.0)}, {"w": t(7.0, -1.0)}]
    assert torch.equal(coordinate_median(two_d)["w"], t(2.0, 8.0))
    ints = [{"n": torch.tensor(v)} for v in (1, 2, 3, 4)]
    assert int(coordinate_median(ints)["n"]) == 2  # 2.5 rounds half to even


def test_trimmed_mean_by_hand() -> None:
    five = column(1, 2, 3, 4, 100)
    assert float(trimmed_mean(five, trim_fraction=0.2)["w"]) == 3.0  # drop 1 and 100
    assert float(trimmed_mean(five, trim_fraction=0.19)["w"]) == 22.0  # floor(0.95) = 0: no cut
    ten = column(-50, 1, 2, 3, 4, 5, 6, 7, 8, 90)
    assert float(trimmed_mean(ten, trim_fraction=0.25)["w"]) == 4.5  # k = 2: mean(2..7)
    assert float(trimmed_mean(ten, trim_fraction=0.1)["w"]) == 4.5  # k = 1: mean(1..8)
    with pytest.raises(ValueError):
        trimmed_mean(five, trim_fraction=0.5)


def test_krum_by_hand() -> None:
    sets = column(0, 1, 2, 10)
    # f = 0, n = 4: each score sums the 2 smallest squared distances to others.
    # 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 4 = 5; 10: 64 + 81 = 145
    assert krum_scores(sets, num_malicious=0).tolist() == [5.0, 2.0, 5.0, 145.0]
    assert float(krum_select(sets, num_malicious=0)["w"]) == 1.0
    # multi-Krum m = 3: {1, 0, 2} -> uniform mean 1; the outlier 10 is never chosen
    assert float(krum_select(sets, num_malicious=0, num_selected=3)["w"]) == 1.0
    # f = 1: n - f - 2 = 1 neighbour: 0 -> 1, 1 -> 1, 2 -> 1, 10 -> 64
    assert krum_scores(sets, num_malicious=1).tolist() == [1.0, 1.0, 1.0, 64.0]
    with pytest.raises(ValueError):
        krum_select(sets, num_malicious=0, num_selected=5)


def test_krum_breaks_ties_by_content_not_position() -> None:
    sets = column(0, 1, 2, 10)
    # Scores for 0 and 2 tie at 5; with m = 2 the pick must not depend on arrival order.
    results = set()
    for perm in itertools.permutations(range(4)):
        chosen = krum_select([sets[i] for i in perm], num_malicious=0, num_selected=2)
        results.add(float(chosen["w"]))
        order = krum_order([sets[i] for i in perm], num_malicious=0)
        assert [float(sets[perm[i]]["w"]) for i in order] == [1.0, 0.0, 2.0, 10.0]
    assert results == {0.5}


def test_merge_and_deltas() -> None:
    g = {"a": t(1.0), "b": t(2.0)}
    assert list(merge(g, {"b": t(5.0)})) == ["a", "b"]
    assert float(merge(g, {"b": t(5.0)})["b"]) == 5.0
    with pytest.raises(ValueError):
        merge(g, {"c": t(1.0)})
    w = Update("s", {"a": t(3.0), "b": t(2.0)}, ParamKind.WEIGHTS, 1)
    d = Update("s", {"a": t(2.0), "b": t(0.0)}, ParamKind.DELTA, 1)
    assert deltas([w, d], g)[0]["a"].item() == 2.0
    assert deltas([w, d], g)[1]["a"].dtype == torch.float64
    assert as_weights(d, g)["a"].item() == 3.0


def test_prepare_updates_validates_and_sorts() -> None:
    g = {"a": t(1.0)}
    ups = [Update(s, {"a": t(1.0)}, ParamKind.WEIGHTS, 1) for s in ("b", "c", "a")]
    assert [u.site for u in prepare_updates(g, ups, None)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="duplicate"):
        prepare_updates(g, ups + ups[:1], None)
    with pytest.raises(ValueError, match="wrong keys"):
        prepare_updates(g, [Update("x", {"a": t(1.0), "z": t(1.0)}, ParamKind.WEIGHTS, 1)], None)
    with pytest.raises(ValueError, match="shape"):
        prepare_updates(g, [Update("x", {"a": t(1.0, 2.0)}, ParamKind.WEIGHTS, 1)], None)
    with pytest.raises(ValueError):
        prepare_updates(g, [], None)


# --- against Flower's numpy implementations ---

SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (2, 4), "fc.bias": (2,)}
KEYS = list(SHAPES)


def random_sets(n: int, seed: int, dtype: torch.dtype = torch.float64) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}
        for _ in range(n)
    ]


def flower_results(sets: list[dict], nums: list[int]) -> list[tuple[list[np.ndarray], int]]:
    return [(to_numpy_list(p, KEYS), n) for p, n in zip(sets, nums, strict=True)]


def assert_close_to_flower(ours: dict, theirs: list[np.ndarray], rtol: float) -> None:
    assert list(ours) == KEYS
    for k, ref in zip(KEYS, theirs, strict=True):
        np.testing.assert_allclose(ours[k].double().numpy(), ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_weighted_mean_matches_flower(n: int, dtype: torch.dtype, rtol: float) -> None:
    sets = random_sets(n, seed=n, dtype=dtype)
    nums = [7, 1, 100, 3, 3, 12][:n]
    ours = weighted_mean(sets, nums)
    assert all(v.dtype == dtype for v in ours.values())
    assert_close_to_flower(ours, aggregate(flower_results(sets, nums)), rtol)


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_matches_flower(n: int) -> None:
    sets = random_sets(n, seed=10 + n)
    ours = coordinate_median(sets)
    assert_close_to_flower(ours, aggregate_median(flower_results(sets, [1] * n)), 1e-12)


@pytest.mark.parametrize(
    "n,fraction", [(5, 0.0), (5, 0.2), (6, 0.2), (7, 0.3), (10, 0.1), (10, 0.25), (10, 0.45)]
)
def test_trimmed_mean_matches_flower(n: int, fraction: float) -> None:
    sets = random_sets(n, seed=20 + n)
    ours = trimmed_mean(sets, trim_fraction=fraction)
    ref = aggregate_trimmed_avg(flower_results(sets, [1] * n), proportiontocut=fraction)
    assert_close_to_flower(ours, ref, 1e-12)


@pytest.mark.parametrize("n,f", [(4, 0), (6, 1), (7, 2), (10, 3)])
def test_krum_matches_flower(n: int, f: int) -> None:
    sets = random_sets(n, seed=30 + n)
    nums = list(range(1, n + 1))
    # Flower: to_keep = 0 -> Krum returns the best vector itself.
    ref = aggregate_krum(flower_results(sets, nums), num_malicious=f, to_keep=0)
    ours = krum_select(sets, num_malicious=f, num_selected=1)
    assert_close_to_flower(ours, ref, 0.0)  # exactly the same set is selected
    # Flower: to_keep = m > 0 -> multi-Krum, mean of the m best weighted by num_examples.
    for m in (2, 3):
        ref = aggregate_krum(flower_results(sets, nums), num_malicious=f, to_keep=m)
        ours = krum_select(sets, num_malicious=f, num_selected=m, weights=nums)
        assert_close_to_flower(ours, ref, 1e-12)
        # and with equal counts Flower's weighted mean is our (default) uniform mean
        ref = aggregate_krum(flower_results(sets, [5] * n), num_malicious=f, to_keep=m)
        assert_close_to_flower(krum_select(sets, num_malicious=f, num_selected=m), ref, 1e-12)
