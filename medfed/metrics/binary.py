"""Operating-point metrics at a fixed threshold, with stratified bootstrap confidence intervals.

In a validation study the threshold is chosen once, on internal validation (Youden's J), and then
applied unchanged to every other split: re-optimising it on a test set would make the reported
sensitivity and specificity optimistic. So nothing here re-picks it, the bootstrap included; the
intervals describe sampling variability of the metrics at that threshold only.

The decision rule everywhere is ``score >= threshold`` -> positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from medfed.metrics.delong import check_labels, check_scores, class_counts
from medfed.types import StrEnum


class Metric(StrEnum):
    ACCURACY = "accuracy"
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    PPV = "ppv"
    NPV = "npv"
    F1 = "f1"


@dataclass(frozen=True)
class BootstrapCI:
    """Point estimate on the full sample and a percentile interval from the resamples."""

    estimate: float
    low: float
    high: float


def _labels_and_scores(
    y_true: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    y = check_labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {s.shape}")
    return y, check_scores(s, y.size)[0]


def _check_threshold(threshold: float) -> float:
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    return float(threshold)


def youden_threshold(y_true: ArrayLike, scores: ArrayLike) -> float:
    """The observed score maximising Youden's J = sensitivity + specificity - 1 under ``>=``.

    Candidates are the distinct observed scores, i.e. every cut point of the empirical ROC curve
    except "call nothing positive" (J = 0, never better than the lowest score, and an infinite
    threshold cannot be applied meaningfully elsewhere).

    Ties in J are broken towards the highest threshold: the choice must be fixed for the threshold
    to be reproducible, and among equally good cut points the highest calls the fewest cases
    positive (favours specificity). J is compared in exact integer arithmetic
    (``J * n_pos * n_neg = tp * n_neg + tn * n_pos - n_pos * n_neg``), so cut points that are
    equally good are recognised as ties, not separated by rounding.
    """
    y, s = _labels_and_scores(y_true, scores)
    n_pos, n_neg = class_counts(y, needed_for="Youden's J")
    values, inverse = np.unique(s, return_inverse=True)
    pos_at = np.bincount(inverse.ravel(), weights=y, minlength=values.size).astype(np.int64)
    neg_at = np.bincount(inverse.ravel(), minlength=values.size).astype(np.int64) - pos_at
    # Counts at or above each candidate: reversed cumulative sums over the ascending values.
    tp = np.cumsum(pos_at[::-1])[::-1]
    fp = np.cumsum(neg_at[::-1])[::-1]
    j_scaled = tp * n_neg + (n_neg - fp) * n_pos
    best = values.size - 1 - int(np.argmax(j_scaled[::-1]))  # last maximum = highest threshold
    return float(values[best])


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, NaN where the denominator is 0: an undefined rate is not 0."""
    out = np.full(np.shape(denominator), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _from_counts(
    tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray
) -> dict[Metric, np.ndarray]:
    """All metrics from confusion counts of any (matching) shape: one formula for the point
    estimate and for every bootstrap resample."""
    return {
        Metric.ACCURACY: _ratio(tp + tn, tp + fp + tn + fn),
        Metric.SENSITIVITY: _ratio(tp, tp + fn),
        Metric.SPECIFICITY: _ratio(tn, tn + fp),
        Metric.PPV: _ratio(tp, tp + fp),
        Metric.NPV: _ratio(tn, tn + fn),
        Metric.F1: _ratio(2 * tp, 2 * tp + fp + fn),
    }


def threshold_metrics(
    y_true: ArrayLike, scores: ArrayLike, threshold: float
) -> dict[Metric, float]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 of ``score >= threshold``.

    A ratio with an empty denominator (PPV with no predicted positives, sensitivity on a split
    without positives, ...) is NaN: reporting 0 would read as a measured failure.
    """
    threshold = _check_threshold(threshold)
    y, s = _labels_and_scores(y_true, scores)
    predicted = s >= threshold
    tp = np.array(np.count_nonzero(predicted & y))
    fp = np.array(np.count_nonzero(predicted & ~y))
    fn = np.array(np.count_nonzero(~predicted & y))
    tn = np.array(np.count_nonzero(~predicted & ~y))
    return {metric: float(value) for metric, value in _from_counts(tp, fp, tn, fn).items()}


def stratified_bootstrap_indices(
    y_true: ArrayLike, *, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Index matrix ``(n_resamples, n)`` of stratified resamples with replacement.

    Positives and negatives are resampled separately so every resample keeps the observed
    ``n_pos`` and ``n_neg``: the study fixed its case mix, and letting prevalence drift would add
    variability to PPV/NPV/accuracy that the study design does not have (and could draw resamples
    with no positives at all). Layout: the first ``n_pos`` columns index positives, the rest
    negatives.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    y = check_labels(y_true)
    positives, negatives = np.flatnonzero(y), np.flatnonzero(~y)
    index = np.empty((n_resamples, y.size), dtype=np.intp)
    for start, members in ((0, positives), (positives.size, negatives)):
        if members.size:
            draws = rng.integers(0, members.size, size=(n_resamples, members.size))
            index[:, start : start + members.size] = members[draws]
    return index


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval ignoring NaN resamples (e.g. PPV where nothing was called positive).

    Dropping them conditions on the metric being defined, which is the only reading under which
    the metric has a value at all; a metric undefined in every resample gets a NaN interval.
    """
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_metrics(
    y_true: ArrayLike,
    scores: ArrayLike,
    threshold: float,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[Metric, BootstrapCI]:
    """Threshold metrics with stratified percentile bootstrap intervals at ``level``.

    Vectorised: the threshold is fixed, so each case reduces to one boolean (called positive or
    not) and a resample's confusion counts are row sums over the index matrix; a study calls this
    for every (model, split) pair, so it has to cost milliseconds. Deterministic for a ``seed``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    threshold = _check_threshold(threshold)
    y, s = _labels_and_scores(y_true, scores)
    n_pos = int(y.sum())
    index = stratified_bootstrap_indices(
        y, n_resamples=n_resamples, rng=np.random.default_rng(seed)
    )
    predicted = s >= threshold
    tp = np.count_nonzero(predicted[index[:, :n_pos]], axis=1)
    fp = np.count_nonzero(predicted[index[:, n_pos:]], axis=1)
    resampled = _from_counts(tp, fp, y.size - n_pos - fp, n_pos - tp)
    point = threshold_metrics(y, s, threshold)
    return {
        metric: BootstrapCI(point[metric], *_percentile_interval(values, level))
        for metric, values in resampled.items()
    }
