import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

from medfed.metrics.binary import (
    BootstrapCI,
    Metric,
    bootstrap_metrics,
    stratified_bootstrap_indices,
    threshold_metrics,
    youden_threshold,
)

two_class_cases = st.lists(
    st.tuples(st.booleans(), st.integers(0, 8)), min_size=2, max_size=50
).filter(lambda xs: len({x[0] for x in xs}) == 2)


def brute_force_youden(y: np.ndarray, s: np.ndarray) -> float:
    """Every observed score tried as `>=` threshold, J in exact fractions, ties -> highest."""
    best_j, best_t = None, None
    for t in sorted(set(s.tolist())):
        called = s >= t
        sens = Fraction(int(np.sum(called & y)), int(y.sum()))
        spec = Fraction(int(np.sum(~called & ~y)), int((~y).sum()))
        j = sens + spec - 1
        if best_j is None or j >= best_j:  # ascending order + `>=`: the highest maximiser wins
            best_j, best_t = j, t
    assert best_t is not None
    return best_t


# --- Youden threshold -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(two_class_cases)
def test_youden_matches_brute_force(cases):
    y = np.array([c[0] for c in cases])
    s = np.array([c[1] for c in cases], dtype=float) / 4
    assert youden_threshold(y, s) == brute_force_youden(y, s)


def test_youden_random_continuous_scores():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = rng.normal(size=300) + 1.2 * y
    t = youden_threshold(y.astype(int), s)
    assert t == brute_force_youden(y, s)
    assert t in s


def test_youden_hand_example_and_tie_break():
    # thresholds 0.2 and 0.6 both reach J = 1/2 (sens 1, spec 1/2 vs sens 1/2, spec 1); the
    # documented rule picks the higher one
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.2, 0.6]
    assert youden_threshold(y, s) == 0.6
    # a perfectly separating cut point wins outright
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == 0.7


def test_youden_needs_both_classes():
    with pytest.raises(ValueError, match="only one class"):
        youden_threshold([1, 1], [0.2, 0.3])


# --- threshold metrics ----------------------------------------------------------------------------


def test_threshold_metrics_hand_example():
    # called positive (score >= 0.6, equality included): 0.9 (+), 0.6 (+), 0.7 (-), 0.6 (-)
    # tp = 2, fp = 2, fn = 1, tn = 2
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.6]
    got = threshold_metrics(y, s, 0.6)
    expected = {
        Metric.ACCURACY: 4 / 7,
        Metric.SENSITIVITY: 2 / 3,
        Metric.SPECIFICITY: 1 / 2,
        Metric.PPV: 1 / 2,
        Metric.NPV: 2 / 3,
        Metric.F1: 4 / 7,
    }
    assert got == pytest.approx(expected)
    assert set(got) == set(Metric)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_threshold_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(200) < 0.35).astype(int)
    s = np.round(rng.normal(size=200) + y, 1)
    t = float(np.quantile(s, 0.6))
    pred = (s >= t).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    got = threshold_metrics(y, s, t)
    assert got[Metric.SPECIFICITY] == pytest.approx(tn / (tn + fp))
    assert got[Metric.NPV] == pytest.approx(tn / (tn + fn))
    assert got[Metric.ACCURACY] == pytest.approx(accuracy_score(y, pred))
    assert got[Metric.SENSITIVITY] == pytest.approx(recall_score(y, pred))
    assert got[Metric.PPV] == pytest.approx(precision_score(y, pred))
    assert got[Metric.F1] == pytest.approx(f1_score(y, pred))
    assert got[Metric.SPECIFICITY] == pytest.approx(recall_score(y, pred, pos_label=0))


def test_undefined_ratios_are_nan_not_zero():
    got = threshold_metrics([0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], threshold=0.9)
    assert math.isnan(got[Metric.PPV])  # nothing called positive
    assert got[Metric.SENSITIVITY] == 0.0 and got[Metric.SPECIFICITY] == 1.0
    assert got[Metric.F1] == 0.0 and got[Metric.NPV] == 0.5
    only_negatives = threshold_metrics([0, 0], [0.1, 0.8], threshold=0.5)
    assert math.isnan(only_negatives[Metric.SENSITIVITY])
    assert only_negatives[Metric.SPECIFICITY] == 0.5


def test_threshold_metrics_errors():
    with pytest.raises(ValueError, match="differ in length"):
        threshold_metrics([0, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        threshold_metrics([0, 1], [0.1, np.nan], 0.5)
    with pytest.raises(ValueError, match="threshold is NaN"):
        threshold_metrics([0, 1], [0.1, 0.2], math.nan)


# --- bootstrap ------------------------------------------------------------------------------------


def _data(seed: int, n: int = 150) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, rng.normal(size=n) + 1.3 * y


def test_bootstrap_is_deterministic_for_a_seed():
    y, s = _data(0)
    first = bootstrap_metrics(y, s, 0.5, n_resamples=300, seed=11)
    assert first == bootstrap_metrics(y, s, 0.5, n_resamples=300, seed=11)
    assert first != bootstrap_metrics(y, s, 0.5, n_resamples=300, seed=12)


def test_bootstrap_estimate_is_the_full_sample_value_inside_its_interval():
    y, s = _data(1)
    point = threshold_metrics(y, s, 0.4)
    boot = bootstrap_metrics(y, s, 0.4, n_resamples=500)
    narrow = bootstrap_metrics(y, s, 0.4, n_resamples=500, level=0.5)
    for metric in Metric:
        ci = boot[metric]
        assert isinstance(ci, BootstrapCI)
        assert ci.estimate == point[metric]
        assert ci.low <= ci.estimate <= ci.high and ci.low < ci.high
        assert ci.low < narrow[metric].low and narrow[metric].high < ci.high


def test_bootstrap_matches_loop_reference_on_the_same_resamples():
    y, s = _data(2, n=80)
    s = np.round(s, 1)  # ties, and cases exactly at the threshold (called positive)
    threshold = float(np.sort(s)[50])
    assert np.count_nonzero(s == threshold) > 1
    index = stratified_bootstrap_indices(y, n_resamples=200, rng=np.random.default_rng(5))
    per_resample = [threshold_metrics(y[row], s[row], threshold) for row in index]
    boot = bootstrap_metrics(y, s, threshold, n_resamples=200, level=0.9, seed=5)
    for metric in Metric:
        values = np.array([r[metric] for r in per_resample])
        low, high = np.nanpercentile(values, [5, 95])
        assert (boot[metric].low, boot[metric].high) == pytest.approx((low, high), abs=1e-12)


def test_stratified_indices_keep_class_counts():
    y = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0])
    index = stratified_bootstrap_indices(y, n_resamples=500, rng=np.random.default_rng(0))
    assert index.shape == (500, 10)
    assert (y[index].sum(axis=1) == 3).all()
    assert (y[index[:, :3]] == 1).all() and (y[index[:, 3:]] == 0).all()
    assert set(np.unique(index[:, :3])) == {0, 3, 7}  # with replacement, every positive drawn


def test_fixed_case_mix_gives_a_degenerate_ppv_interval():
    # everyone called positive: PPV = n_pos / n in every stratified resample (but not in a
    # resample that let prevalence drift)
    y, s = _data(3)
    boot = bootstrap_metrics(y, s, threshold=-100.0, n_resamples=300)
    ppv = boot[Metric.PPV]
    assert ppv.low == ppv.high == ppv.estimate == pytest.approx(y.mean())
    assert boot[Metric.SENSITIVITY] == BootstrapCI(1.0, 1.0, 1.0)


@pytest.mark.filterwarnings("error")
def test_nan_resamples_are_ignored_and_all_nan_gives_nan_without_warnings():
    # a single positive is called positive (and no negative): PPV is 1 when defined, NaN when the
    # resample misses that case (about 36% of resamples)
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    s = np.r_[1.0, np.zeros(39)]
    ppv = bootstrap_metrics(y, s, 0.5, n_resamples=300)[Metric.PPV]
    assert ppv == BootstrapCI(1.0, 1.0, 1.0)
    never = bootstrap_metrics(y, s, 2.0, n_resamples=300)[Metric.PPV]
    assert all(math.isnan(v) for v in (never.estimate, never.low, never.high))


def test_bootstrap_argument_errors():
    y, s = _data(4, n=20)
    with pytest.raises(ValueError, match="level"):
        bootstrap_metrics(y, s, 0.5, level=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_metrics(y, s, 0.5, n_resamples=0)


def test_bootstrap_interval_coverage_in_a_known_population():
    # binormal population: negatives N(0, 1), positives N(1.5, 1); fixed threshold 0.75, so the
    # true sensitivity is P(N(1.5, 1) >= 0.75) and the true specificity P(N(0, 1) < 0.75)
    threshold, shift, n_pos, n_neg = 0.75, 1.5, 100, 100
    true_sens = norm.sf(threshold - shift)
    true_spec = norm.cdf(threshold)
    rng = np.random.default_rng(1234)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    hits_sens = hits_spec = 0
    simulations = 200
    for sim in range(simulations):
        s = rng.normal(size=n_pos + n_neg) + shift * y
        boot = bootstrap_metrics(y, s, threshold, n_resamples=400, seed=sim)
        hits_sens += boot[Metric.SENSITIVITY].low <= true_sens <= boot[Metric.SENSITIVITY].high
        hits_spec += boot[Metric.SPECIFICITY].low <= true_spec <= boot[Metric.SPECIFICITY].high
    assert 0.88 <= hits_sens / simulations <= 0.99
    assert 0.88 <= hits_spec / simulations <= 0.99
