import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from medfed.data.split import stratified_group_split, stratified_split

fractions = st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5, 0.7])


def assert_partition(train: np.ndarray, val: np.ndarray, n: int) -> None:
    for idx in (train, val):
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))


def patient_cohort(seed: int, n_patients: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """1-5 cases per patient; labels correlated within a patient (80% follow the patient's)."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), rng.integers(1, 6, n_patients))
    positive = rng.random(n_patients) < 0.3
    labels = np.where(rng.random(len(patient)) < 0.8, positive[patient], ~positive[patient])
    return labels.astype(np.int64), np.array([f"P{p:04d}" for p in patient])


@settings(max_examples=80, deadline=None)
@given(
    cases=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 15)), min_size=2, max_size=80),
    val_fraction=fractions,
    seed=st.integers(0, 2**32 - 1),
)
def test_no_patient_on_both_sides(
    cases: list[tuple[int, int]], val_fraction: float, seed: int
) -> None:
    labels = np.array([c for c, _ in cases])
    groups = np.array([f"g{g}" for _, g in cases])
    assume(len(set(groups)) >= 2)
    train, val = stratified_group_split(labels, groups, val_fraction=val_fraction, seed=seed)
    assert_partition(train, val, len(labels))
    assert not set(groups[train]) & set(groups[val])
    assert len(train) > 0 and len(val) > 0
    again = stratified_group_split(labels, groups, val_fraction=val_fraction, seed=seed)
    np.testing.assert_array_equal(val, again[1])


@settings(max_examples=80, deadline=None)
@given(
    group_class=st.lists(st.integers(0, 2), min_size=2, max_size=30),
    sizes=st.lists(st.integers(1, 6), min_size=30, max_size=30),
    val_fraction=fractions,
    seed=st.integers(0, 2**32 - 1),
)
def test_every_class_with_two_groups_is_on_both_sides(
    group_class: list[int], sizes: list[int], val_fraction: float, seed: int
) -> None:
    # Single-class patients: then covering both sides is always possible, so it is required.
    reps = sizes[: len(group_class)]
    labels = np.repeat(group_class, reps)
    groups = np.repeat([f"p{i}" for i in range(len(group_class))], reps)
    train, val = stratified_group_split(labels, groups, val_fraction=val_fraction, seed=seed)
    for c in set(group_class):
        if group_class.count(c) >= 2:
            assert c in labels[train] and c in labels[val]


@settings(max_examples=80, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=2, max_size=120),
    val_fraction=fractions,
    seed=st.integers(0, 2**32 - 1),
)
def test_unique_groups_behave_like_stratified_split(
    labels: list[int], val_fraction: float, seed: int
) -> None:
    y = np.array(labels)
    groups = [f"case{i}" for i in range(len(y))]
    train, val = stratified_group_split(y, groups, val_fraction=val_fraction, seed=seed)
    assert_partition(train, val, len(y))
    _, ref_val = stratified_split(y, val_fraction=val_fraction, seed=seed)
    for c in np.unique(y):
        n_c = int(np.sum(y == c))
        got = int(np.sum(y[val] == c))
        assert abs(got - round(n_c * val_fraction)) <= 1
        assert abs(got - int(np.sum(y[ref_val] == c))) <= 1
        if n_c >= 2:
            assert 1 <= got <= n_c - 1


@pytest.mark.parametrize("seed", range(5))
def test_class_shares_close_to_target_on_patient_cohort(seed: int) -> None:
    labels, groups = patient_cohort(seed)
    train, val = stratified_group_split(labels, groups, val_fraction=0.2, seed=seed)
    assert_partition(train, val, len(labels))
    assert not set(groups[train]) & set(groups[val])
    for c in (0, 1):
        share = np.sum(labels[val] == c) / np.sum(labels == c)
        assert share == pytest.approx(0.2, abs=0.01)


def test_deterministic_by_seed_and_seed_matters() -> None:
    labels, groups = patient_cohort(0, n_patients=60)
    a = stratified_group_split(labels, groups, val_fraction=0.25, seed=1)
    b = stratified_group_split(labels, groups, val_fraction=0.25, seed=1)
    np.testing.assert_array_equal(a[1], b[1])
    others = [stratified_group_split(labels, groups, val_fraction=0.25, seed=s)[1] for s in (2, 3)]
    assert any(not np.array_equal(a[1], o) for o in others)


def test_hand_example_keeps_patients_whole() -> None:
    # Patient A has 4 cases, B..E one or two: with f=0.5 of 10 cases, A cannot be split.
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 1])
    groups = np.array(["A", "A", "A", "A", "B", "B", "C", "D", "E", "E"])
    train, val = stratified_group_split(labels, groups, val_fraction=0.5, seed=0)
    assert_partition(train, val, 10)
    a_side = {("val" if i in val else "train") for i in range(4)}
    assert len(a_side) == 1
    # 5 cases per class, target 2.5: any whole-group choice is at least half a case off
    assert np.sum(labels[val] == 0) in (2, 3) and np.sum(labels[val] == 1) in (2, 3)


def test_two_groups_go_one_each_side() -> None:
    train, val = stratified_group_split([0, 1, 1], ["a", "b", "b"], val_fraction=0.2, seed=0)
    assert {len(train), len(val)} == {1, 2}


@pytest.mark.parametrize("groups", [["p1", "p1", "p1"], []])
def test_fewer_than_two_groups_raise(groups: list[str]) -> None:
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        stratified_group_split(np.zeros(len(groups)), groups, val_fraction=0.2, seed=0)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_group_split([0, 1], ["a", "b"], val_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="equal length"):
        stratified_group_split([0, 1, 1], ["a", "b"], val_fraction=0.5, seed=0)
