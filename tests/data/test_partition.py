import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.data.partition import (
    PartitionKind,
    column_partition,
    dirichlet_partition,
    iid_partition,
    label_skew,
    partition,
    quantity_partition,
)


def assert_covers(parts: list[np.ndarray], n: int) -> None:
    """Sorted int64 arrays that together hold every index in range(n) exactly once."""
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def sizes(parts: list[np.ndarray]) -> np.ndarray:
    return np.array([len(p) for p in parts])


def cv(parts: list[np.ndarray]) -> float:
    s = sizes(parts)
    return float(s.std() / s.mean())


LABELS = np.random.default_rng(0).integers(0, 2, 400)
alphas = st.floats(0.01, 1000.0)


# ---- coverage and determinism (properties) -------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_iid_covers_and_balances(n: int, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(1, min(n, 20)))
    parts = iid_partition(n, num_sites=k, seed=seed)
    assert len(parts) == k
    assert_covers(parts, n)
    assert sizes(parts).max() - sizes(parts).min() <= 1
    assert same(parts, iid_partition(n, num_sites=k, seed=seed))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    data=st.data(),
    alpha=alphas,
    seed=st.integers(0, 2**32 - 1),
)
def test_quantity_covers_and_respects_min_size(
    n: int, data: st.DataObject, alpha: float, seed: int
) -> None:
    k = data.draw(st.integers(1, min(n, 12)))
    min_size = data.draw(st.integers(1, n // k))
    parts = quantity_partition(n, num_sites=k, alpha=alpha, seed=seed, min_size=min_size)
    assert len(parts) == k
    assert_covers(parts, n)
    assert sizes(parts).min() >= min_size
    again = quantity_partition(n, num_sites=k, alpha=alpha, seed=seed, min_size=min_size)
    assert same(parts, again)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=200),
    data=st.data(),
    alpha=alphas,
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_covers_or_says_why(
    labels: list[int], data: st.DataObject, alpha: float, seed: int
) -> None:
    y = np.array(labels)
    k = data.draw(st.integers(1, min(len(y), 8)))
    min_size = data.draw(st.integers(1, max(1, len(y) // (2 * k))))
    try:
        parts = dirichlet_partition(y, num_sites=k, alpha=alpha, seed=seed, min_size=min_size)
    except ValueError as e:  # infeasible draws are allowed, but only with the explanation
        assert "could not give" in str(e) and "raise alpha" in str(e)
        return
    assert len(parts) == k
    assert_covers(parts, len(y))
    assert sizes(parts).min() >= min_size
    # The NIID-Bench cap: a site that reached n/k gets no further class, so no site exceeds
    # n/k by more than one class's worth (label skew does not smuggle in unbounded quantity skew).
    assert sizes(parts).max() < len(y) / k + np.bincount(y).max()
    again = dirichlet_partition(y, num_sites=k, alpha=alpha, seed=seed, min_size=min_size)
    assert same(parts, again)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: iid_partition(100, num_sites=4, seed=s),
        lambda s: quantity_partition(100, num_sites=4, alpha=1.0, seed=s),
        lambda s: dirichlet_partition(LABELS, num_sites=4, alpha=1.0, seed=s),
    ],
    ids=["iid", "quantity", "dirichlet"],
)
def test_different_seeds_give_different_partitions(make) -> None:
    first = make(0)
    assert any(not np.array_equal(first[0], make(s)[0]) for s in range(1, 4))


# ---- heterogeneity moves with alpha --------------------------------------------------------


def test_dirichlet_label_skew_decreases_with_alpha() -> None:
    def mean_skew(alpha: float) -> float:
        return float(
            np.mean(
                [
                    label_skew(
                        LABELS, dirichlet_partition(LABELS, num_sites=5, alpha=alpha, seed=s)
                    )
                    for s in range(20)
                ]
            )
        )

    iid = np.mean([label_skew(LABELS, iid_partition(400, num_sites=5, seed=s)) for s in range(20)])
    s01, s1, s100 = mean_skew(0.1), mean_skew(1.0), mean_skew(100.0)
    assert s01 > s1 + 0.05 > s100 + 0.1
    assert s100 <= iid + 0.01  # alpha -> inf is IID (even a little more even: class-stratified)


def test_quantity_size_spread_decreases_with_alpha() -> None:
    def mean_cv(alpha: float) -> float:
        return float(
            np.mean(
                [cv(quantity_partition(400, num_sites=5, alpha=alpha, seed=s)) for s in range(20)]
            )
        )

    c01, c1, c100 = mean_cv(0.1), mean_cv(1.0), mean_cv(100.0)
    assert c01 > c1 > c100
    assert c100 < 0.15


def test_quantity_keeps_labels_iid() -> None:
    skews = [
        label_skew(LABELS, quantity_partition(400, num_sites=4, alpha=100.0, seed=s))
        for s in range(10)
    ]
    assert np.mean(skews) < 0.08


# ---- hand-checkable cases ------------------------------------------------------------------


def test_huge_alpha_splits_each_class_evenly() -> None:
    y = np.repeat([0, 1], 40)
    parts = dirichlet_partition(y, num_sites=4, alpha=1e6, seed=0)
    for p in parts:
        assert abs(np.sum(y[p] == 0) - 10) <= 1 and abs(np.sum(y[p] == 1) - 10) <= 1
    np.testing.assert_allclose(
        sizes(quantity_partition(80, num_sites=4, alpha=1e6, seed=0)), 20, atol=1
    )


def test_small_alpha_concentrates_each_class_on_one_site() -> None:
    y = np.repeat([0, 1, 2, 3], 50)

    def top_share(alpha: float, seed: int) -> float:
        parts = dirichlet_partition(y, num_sites=4, alpha=alpha, seed=seed)
        per_site = np.array([np.bincount(y[p], minlength=4) for p in parts])  # sites x classes
        return float(np.mean(per_site.max(axis=0) / 50))

    assert np.mean([top_share(0.01, s) for s in range(5)]) > 0.9
    assert np.mean([top_share(100.0, s) for s in range(5)]) < 0.35


def test_min_size_respected_at_small_alpha() -> None:
    y = np.repeat([0, 1, 2, 3, 4], 40)
    parts = dirichlet_partition(y, num_sites=5, alpha=0.3, seed=1, min_size=15)
    assert sizes(parts).min() >= 15
    parts = quantity_partition(200, num_sites=5, alpha=0.05, seed=1, min_size=30)
    assert sizes(parts).min() >= 30


def test_impossible_requests_raise() -> None:
    with pytest.raises(ValueError, match="cannot give 6 sites >= 1 cases each from only 5"):
        iid_partition(5, num_sites=6, seed=0)
    with pytest.raises(ValueError, match="cannot give"):
        quantity_partition(10, num_sites=3, alpha=1.0, seed=0, min_size=4)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(np.zeros(3), num_sites=4, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="could not give each of 20 sites"):
        dirichlet_partition(LABELS, num_sites=20, alpha=0.05, seed=0)
    with pytest.raises(ValueError, match="num_sites must be >= 1"):
        iid_partition(5, num_sites=0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        quantity_partition(10, num_sites=2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        dirichlet_partition(LABELS, num_sites=2, alpha=1.0, seed=0, min_size=0)


def test_column_partition_hand_example() -> None:
    scanners = ["GE", "Siemens", "GE", "Philips", "Siemens", "GE"]
    parts = column_partition(scanners)
    assert list(parts) == ["GE", "Philips", "Siemens"]
    np.testing.assert_array_equal(parts["GE"], [0, 2, 5])
    np.testing.assert_array_equal(parts["Philips"], [3])
    np.testing.assert_array_equal(parts["Siemens"], [1, 4])
    assert all(p.dtype == np.int64 for p in parts.values())


def test_column_partition_refuses_missing_values() -> None:
    with pytest.raises(ValueError, match="non-blank strings"):
        column_partition(["GE", None, "GE"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="non-blank strings"):
        column_partition(["GE", " "])
    with pytest.raises(ValueError, match="empty"):
        column_partition([])


def test_label_skew_hand_values() -> None:
    y = np.array([0, 0, 1, 1])
    assert label_skew(y, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(0.5)
    assert label_skew(y, [np.array([0, 2]), np.array([1, 3])]) == pytest.approx(0.0)
    # site 1 is 2/3 class 0 vs pooled 1/2 -> TV 1/6; site 2 is all class 1 -> TV 1/2
    assert label_skew(y, [np.array([0, 1, 2]), np.array([3])]) == pytest.approx((1 / 6 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="empty"):
        label_skew(y, [np.arange(4), np.array([], dtype=np.int64)])


# ---- dispatcher ----------------------------------------------------------------------------


def test_partition_names_sites_and_matches_direct_calls() -> None:
    out = partition(PartitionKind.DIRICHLET, labels=LABELS, num_sites=3, alpha=0.5, seed=7)
    assert list(out) == ["site1", "site2", "site3"]
    direct = dirichlet_partition(LABELS, num_sites=3, alpha=0.5, seed=7)
    assert same(list(out.values()), direct)

    out = partition("iid", labels=LABELS, num_sites=2, seed=1)
    assert same(list(out.values()), iid_partition(400, num_sites=2, seed=1))

    out = partition("quantity", labels=LABELS, num_sites=4, alpha=0.2, seed=2, min_size=50)
    assert sizes(list(out.values())).min() >= 50
    assert_covers(list(out.values()), 400)

    out = partition(PartitionKind.COLUMN, labels=np.zeros(3), column=["b", "a", "b"])
    assert list(out) == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "iid"}, "requires num_sites"),
        ({"kind": "iid", "num_sites": 2, "alpha": 0.5}, "does not use alpha"),
        ({"kind": "iid", "num_sites": 2, "min_size": 3}, "does not use min_size"),
        ({"kind": "dirichlet", "num_sites": 2}, "requires alpha"),
        ({"kind": "quantity", "alpha": 1.0}, "requires num_sites"),
        (
            {"kind": "dirichlet", "num_sites": 2, "alpha": 1.0, "column": ["a"] * 4},
            "does not use column",
        ),
        ({"kind": "column"}, "requires column"),
        ({"kind": "column", "column": ["a"] * 4, "num_sites": 2}, "does not use num_sites"),
        ({"kind": "column", "column": ["a"] * 3}, "column has 3 values but there are 4"),
        ({"kind": "hospital"}, "unknown partition kind 'hospital'"),
    ],
)
def test_partition_rejects_missing_and_irrelevant_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(labels=np.array([0, 1, 0, 1]), **kwargs)


# --- partition_by_group: patients, not cases, are dealt out ---

from hypothesis import given as _given  # noqa: E402
from hypothesis import settings as _settings  # noqa: E402
from hypothesis import strategies as _st  # noqa: E402

from medfed.data.partition import partition_by_group  # noqa: E402


@_settings(deadline=None, max_examples=40)
@_given(
    n_patients=_st.integers(6, 40),
    per_patient=_st.lists(_st.integers(1, 4), min_size=40, max_size=40),
    seed=_st.integers(0, 10_000),
    kind=_st.sampled_from(["iid", "dirichlet", "quantity"]),
)
def test_group_partition_keeps_each_patient_at_one_site(n_patients, per_patient, seed, kind):
    groups = [f"p{g}" for g in range(n_patients) for _ in range(per_patient[g])]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=len(groups))
    extra = {} if kind == "iid" else {"alpha": 1.0}
    parts = partition_by_group(kind, labels=labels, groups=groups, num_sites=3, seed=seed, **extra)
    allidx = np.concatenate(list(parts.values()))
    assert sorted(allidx.tolist()) == list(range(len(groups)))  # every case exactly once
    owner = {}
    for site, idx in parts.items():
        for i in idx:
            assert owner.setdefault(groups[i], site) == site  # never two sites for one patient


def test_group_partition_with_one_case_per_patient_is_the_plain_partition():
    labels = np.array([0, 1] * 30)
    groups = [f"p{i}" for i in range(60)]
    a = partition_by_group(
        "dirichlet", labels=labels, groups=groups, num_sites=4, alpha=0.5, seed=3
    )
    b = partition("dirichlet", labels=labels, num_sites=4, alpha=0.5, seed=3)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_group_partition_by_column_uses_each_patients_usual_scanner():
    groups = ["a", "a", "a", "b", "b", "c"]
    scanner = ["X", "X", "Y", "Y", "Y", "X"]
    parts = partition_by_group(
        "column", labels=np.zeros(6, dtype=int), groups=groups, column=scanner
    )
    assert {k: v.tolist() for k, v in parts.items()} == {"X": [0, 1, 2, 5], "Y": [3, 4]}
