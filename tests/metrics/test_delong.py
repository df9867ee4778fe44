import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from medfed.metrics.delong import auc_with_ci, delong_test, fast_delong, midrank

# --- independent reference: DeLong, DeLong & Clarke-Pearson (1988), computed pair by pair ----------


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def reference_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """O(k m n) structural components straight from the 1988 paper, with explicit loops."""
    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    k = scores.shape[0]
    pos = [scores[r, y] for r in range(k)]
    neg = [scores[r, ~y] for r in range(k)]
    m, n = len(pos[0]), len(neg[0])
    v10 = np.zeros((k, m))
    v01 = np.zeros((k, n))
    for r in range(k):
        for i in range(m):
            for j in range(n):
                p = _psi(pos[r][i], neg[r][j])
                v10[r, i] += p / n
                v01[r, j] += p / m
    theta = np.array([sum(v10[r]) / m for r in range(k)])
    s10 = np.zeros((k, k))
    s01 = np.zeros((k, k))
    for r in range(k):
        for q in range(k):
            s10[r, q] = sum((v10[r, i] - theta[r]) * (v10[q, i] - theta[q]) for i in range(m)) / (
                m - 1
            )
            s01[r, q] = sum((v01[r, j] - theta[r]) * (v01[q, j] - theta[q]) for j in range(n)) / (
                n - 1
            )
    return theta, s10 / m + s01 / n


def reference_test(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    theta, cov = reference_delong(y, np.vstack([a, b]))
    z = (theta[0] - theta[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return z, math.erfc(abs(z) / math.sqrt(2))  # two-sided normal p, without scipy


def _random_case(seed: int, n: int, k: int, *, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    y[:2] = [False, True]
    latent = y[np.newaxis, :] * rng.uniform(0.3, 1.5, size=(k, 1)) + rng.normal(size=(k, n))
    scores = np.round(latent * 2) / 2 if tied else latent  # rounding -> heavy ties
    return y.astype(int), scores


# --- midrank ------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40))
def test_midrank_matches_scipy_average_ranks(values):
    x = np.array(values, dtype=float)
    np.testing.assert_allclose(midrank(x), rankdata(x, method="average"), rtol=0, atol=1e-12)


def test_midrank_hand_example():
    np.testing.assert_array_equal(midrank(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


def test_midrank_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        midrank(np.array([1.0, np.nan]))


# --- AUC point estimate ---------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 4)), min_size=2, max_size=60).filter(
        lambda xs: len({x[0] for x in xs}) == 2
    )
)
def test_auc_matches_sklearn_with_heavy_ties(cases):
    y = np.array([c[0] for c in cases])
    s = np.array([c[1] for c in cases], dtype=float)
    aucs, _ = fast_delong(y, s)
    assert aucs[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc_with_ci(y, s).auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_for_each_row(seed, tied):
    y, scores = _random_case(seed, 150, 3, tied=tied)
    aucs, _ = fast_delong(y, scores)
    np.testing.assert_allclose(aucs, [roc_auc_score(y, row) for row in scores], atol=1e-12)


def test_hand_checkable_case():
    # positives 0.35, 0.8; negatives 0.1, 0.4.  V10 = (1/2, 1), V01 = (1, 1/2), AUC = 3/4,
    # S10 = S01 = 2 * (1/4)^2 / 1 = 1/8, var = S10/2 + S01/2 = 1/8.
    est = auc_with_ci([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert est.auc == pytest.approx(0.75)
    assert est.variance == pytest.approx(0.125)
    assert (est.n_pos, est.n_neg, est.level) == (2, 2, 0.95)
    assert est.ci == pytest.approx((0.75 - 1.959963984540054 * math.sqrt(0.125), 1.0))


def test_labels_may_be_bool_or_int_and_scores_1d_or_2d():
    y, s = _random_case(3, 40, 1, tied=False)
    a1, c1 = fast_delong(y, s[0])
    a2, c2 = fast_delong(y.astype(bool), s)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(c1, c2)
    assert c1.shape == (1, 1)


# --- variance, covariance, test statistic against the O(n^2) reference --------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_covariance_matches_direct_delong(seed, k, tied):
    y, scores = _random_case(10 * seed + k, 70, k, tied=tied)
    aucs, cov = fast_delong(y, scores)
    ref_aucs, ref_cov = reference_delong(y, scores)
    assert cov.shape == (k, k)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 6), st.integers(0, 6)), min_size=4, max_size=30
    )
)
def test_covariance_matches_direct_delong_property(cases):
    y = np.array([c[0] for c in cases])
    assume(y.sum() >= 2 and (~y).sum() >= 2)
    scores = np.array([[c[1] for c in cases], [c[2] for c in cases]], dtype=float)
    aucs, cov = fast_delong(y, scores)
    ref_aucs, ref_cov = reference_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_z_and_p_match_direct_delong(seed, tied):
    y, scores = _random_case(seed, 90, 2, tied=tied)
    result = delong_test(y, scores[0], scores[1])
    z, p = reference_test(y, scores[0], scores[1])
    _, ref_cov = reference_delong(y, scores)
    assert result.variance == pytest.approx(
        ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1], rel=1e-10
    )
    assert result.z == pytest.approx(z, rel=1e-10)
    assert result.p_value == pytest.approx(p, rel=1e-10)
    assert result.difference == pytest.approx(result.auc_a - result.auc_b, abs=1e-15)
    assert result.auc_a == pytest.approx(roc_auc_score(y, scores[0]), abs=1e-12)


def test_ci_is_wald_interval_on_reference_variance_and_clipped():
    y, scores = _random_case(5, 120, 1, tied=False)
    _, ref_cov = reference_delong(y, scores)
    est = auc_with_ci(y, scores[0], level=0.9)
    half = 1.6448536269514722 * math.sqrt(ref_cov[0, 0])
    assert est.ci == pytest.approx((est.auc - half, est.auc + half), rel=1e-10)
    # nearly separable: the unclipped upper bound would exceed 1
    y2 = np.r_[np.zeros(30), np.ones(30)]
    s2 = np.r_[np.linspace(0, 1, 30), np.linspace(0.98, 2, 30)]
    near = auc_with_ci(y2, s2)
    assert near.auc + 1.96 * math.sqrt(near.variance) > 1
    assert near.ci[1] == 1.0 and 0.0 < near.ci[0] < near.auc


def test_identical_scores_give_no_evidence_not_nan():
    y, scores = _random_case(7, 50, 1, tied=True)
    result = delong_test(y, scores[0], scores[0].copy())
    assert (result.difference, result.variance, result.z, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_single_positive_gives_nan_variance_not_zero():
    est = auc_with_ci([0, 0, 0, 1], [0.1, 0.2, 0.5, 0.3])
    assert est.auc == pytest.approx(2 / 3)
    assert math.isnan(est.variance) and all(math.isnan(b) for b in est.ci)


# --- p-value behaviour under H0 and H1 ----------------------------------------------------------


def _two_models(rng: np.random.Generator, n: int, shift_b: float) -> tuple[np.ndarray, ...]:
    y = rng.random(n) < 0.5
    signal = rng.normal(size=n) + 1.0 * y
    a = signal + rng.normal(size=n)
    b = signal + rng.normal(size=n) + shift_b * y
    return y, a, b


def test_p_values_are_not_systematically_small_under_h0():
    rng = np.random.default_rng(2024)
    p = np.array([delong_test(*_two_models(rng, 120, 0.0)).p_value for _ in range(200)])
    assert np.mean(p < 0.05) < 0.12
    assert 0.35 < np.mean(p) < 0.65  # roughly uniform, not stuck at 1


def test_p_values_detect_a_real_difference():
    rng = np.random.default_rng(7)
    p = np.array([delong_test(*_two_models(rng, 200, 1.5)).p_value for _ in range(50)])
    assert np.mean(p < 0.05) > 0.8


# --- errors ---------------------------------------------------------------------------------------


def test_single_class_is_an_error():
    with pytest.raises(ValueError, match="only one class"):
        fast_delong([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        auc_with_ci([0, 0], [0.1, 0.2])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length: 4 vs 3"):
        fast_delong([0, 1, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores_b"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2])


def test_nan_scores_are_an_error_naming_the_input():
    with pytest.raises(ValueError, match=r"scores contain NaN .*index 2"):
        auc_with_ci([0, 1, 0, 1], [0.1, 0.2, np.nan, 0.4])
    with pytest.raises(ValueError, match=r"scores_a contain NaN"):
        delong_test([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])


def test_non_binary_labels_are_an_error():
    with pytest.raises(ValueError, match="binary"):
        fast_delong([0, 1, 2], [0.1, 0.2, 0.3])


def test_level_must_be_a_probability():
    with pytest.raises(ValueError, match="level"):
        auc_with_ci([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], level=95)
