"""DeLong's AUC variance and paired test, in the fast midrank form of Sun & Xu (2014).

A validation study reports each AUC with a confidence interval and compares models evaluated on the
same cases. Those AUCs are correlated (same patients), so an unpaired comparison would be wrong;
DeLong, DeLong & Clarke-Pearson (1988) give the covariance of correlated AUCs nonparametrically from
the structural components. Computed directly that needs every positive-negative pair, O(m n);
Sun & Xu (IEEE SPL 21(11), 2014) show that the components are differences of midranks, so the
whole covariance matrix costs k sorts, O(k N log N), which matters for external sets of many
thousand cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm


def check_labels(y_true: ArrayLike) -> NDArray[np.bool_]:
    """Binary labels as a boolean vector.

    Validated here, once, because a label coded 2 or -1 silently becomes "positive" under
    ``astype(bool)`` and would corrupt every number derived from it.
    """
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {y.shape}")
    if y.dtype == np.bool_:
        return y
    if not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"y_true must hold binary labels 0/1 (or bool); found {bad.tolist()}")
    return y == 1


def check_scores(scores: ArrayLike, n: int, *, name: str = "scores") -> NDArray[np.float64]:
    """Scores as a float matrix of shape ``(k, n)``, one row per model.

    NaN is rejected rather than ranked: a NaN compares unequal to everything, so it would get an
    arbitrary rank and a plausible-looking but meaningless AUC.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[np.newaxis, :]
    if s.ndim != 2:
        raise ValueError(f"{name} must have shape (n,) or (k, n), got {s.shape}")
    if s.shape[1] != n:
        raise ValueError(f"y_true and {name} differ in length: {n} vs {s.shape[1]}")
    if np.isnan(s).any():
        row, col = np.argwhere(np.isnan(s))[0]
        where = f"index {col}" if s.shape[0] == 1 else f"row {row}, index {col}"
        raise ValueError(
            f"{name} contain NaN ({int(np.isnan(s).sum())} value(s), first at {where})"
        )
    return s


def class_counts(y: NDArray[np.bool_], *, needed_for: str = "an AUC") -> tuple[int, int]:
    """(n_pos, n_neg), refusing a single class: no ROC-based quantity exists without both."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"y_true contains only one class (n_pos={n_pos}, n_neg={n_neg}); "
            f"{needed_for} needs both positives and negatives"
        )
    return n_pos, n_neg


def midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks where tied values share the mean of the ranks they span.

    Midranks are what make the Mann-Whitney AUC count a tie as one half, which is the convention
    DeLong's psi uses; ordinal ranks would credit ties to whichever case happened to sort first.
    """
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"midrank expects a one-dimensional array, got shape {v.shape}")
    if np.isnan(v).any():
        raise ValueError("midrank is undefined for NaN values")
    n = v.size
    ranks = np.empty(n, dtype=np.float64)
    if n == 0:
        return ranks
    order = np.argsort(v, kind="mergesort")
    ordered = v[order]
    starts_group = np.empty(n, dtype=np.bool_)
    starts_group[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_group[1:])
    first = np.flatnonzero(starts_group)  # 0-based position where each tie group starts
    last = np.append(first[1:], n)  # exclusive end, i.e. the 1-based rank of its last member
    group = np.cumsum(starts_group) - 1
    ranks[order] = ((first + 1 + last) / 2.0)[group]
    return ranks


def _covariance(components: NDArray[np.float64]) -> np.ndarray:
    """Sample covariance (ddof 1) of structural components across cases; NaN with one case.

    With a single positive (or negative) the spread of its components is unobservable: NaN says
    so, where a zero would claim a perfectly precise AUC.
    """
    k, count = components.shape
    if count < 2:
        return np.full((k, k), np.nan)
    centred = components - components.mean(axis=1, keepdims=True)
    return (centred @ centred.T) / (count - 1)


def _components(y: NDArray[np.bool_], s: NDArray[np.float64]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: ``V10`` (k, m) per positive and ``V01`` (k, n) per negative.

    ``V10`` is the share of negatives a positive outscores and ``V01`` the share of positives that
    outscore a negative (ties count 1/2); both average to the AUC.
    """
    m, n = class_counts(y)
    k = s.shape[0]
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    for r in range(k):
        overall = midrank(s[r])
        # A case's rank among all cases minus its rank within its own class counts the cases of
        # the other class below it (ties halved): Sun & Xu's identity that removes the m*n loop.
        v10[r] = (overall[y] - midrank(s[r, y])) / n
        v01[r] = 1.0 - (overall[~y] - midrank(s[r, ~y])) / m
    return v10, v01


def fast_delong(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of ``k`` score vectors on the same cases and the covariance matrix of those estimates.

    ``scores`` has shape ``(k, n)`` or ``(n,)``; the result is ``(aucs (k,), covariance (k, k))``.
    Variances are NaN when a class has a single case (see ``_covariance``).
    """
    y = check_labels(y_true)
    s = check_scores(scores, y.size)
    v10, v01 = _components(y, s)
    aucs = v10.mean(axis=1)
    covariance = _covariance(v10) / v10.shape[1] + _covariance(v01) / v01.shape[1]
    return aucs, covariance


@dataclass(frozen=True)
class AucEstimate:
    """An AUC with its DeLong variance and a Wald interval at ``level``."""

    auc: float
    variance: float
    ci: tuple[float, float]
    level: float
    n_pos: int
    n_neg: int


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    return float(level)


def auc_with_ci(y_true: ArrayLike, scores: ArrayLike, *, level: float = 0.95) -> AucEstimate:
    """AUC and its ``level`` confidence interval ``auc ± z sqrt(var)``, clipped to [0, 1].

    The Wald interval on the AUC scale can overshoot 1 for a near-perfect model; clipping (as
    pROC's ``ci.auc`` does) keeps the reported bounds possible without changing coverage in the
    interior. Scores must be one vector: intervals for several models are separate calls.
    """
    level = _check_level(level)
    y = check_labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"auc_with_ci takes one score vector, got shape {s.shape}")
    aucs, cov = fast_delong(y, s)
    auc, variance = float(aucs[0]), float(cov[0, 0])
    if math.isnan(variance):  # spelled out: Python's min/max would swallow the NaN
        ci = (math.nan, math.nan)
    else:
        half = float(norm.ppf(0.5 + level / 2.0)) * math.sqrt(variance)
        ci = (max(0.0, auc - half), min(1.0, auc + half))
    n_pos = int(y.sum())
    return AucEstimate(
        auc=auc,
        variance=variance,
        ci=ci,
        level=level,
        n_pos=n_pos,
        n_neg=y.size - n_pos,
    )


@dataclass(frozen=True)
class DelongTest:
    """Paired comparison of two AUCs on the same cases; ``difference = auc_a - auc_b``."""

    auc_a: float
    auc_b: float
    difference: float
    variance: float
    z: float
    p_value: float


def delong_test(y_true: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike) -> DelongTest:
    """Two-sided DeLong test of ``AUC_a == AUC_b`` for two models scored on the same cases.

    The variance of the difference uses the covariance of the two AUCs; ignoring it (as an
    unpaired test would) overstates the variance when models agree and loses most of the power.

    Degenerate variance: identical score vectors give a difference and a variance of exactly 0,
    which is reported as no evidence (``z = 0``, ``p = 1``) instead of 0/0. A non-zero difference
    with zero estimated variance (e.g. a perfect model against a constant one) gives ``z = ±inf``
    and ``p = 0``: that is what the estimator says, and it only occurs in degenerate data.
    """
    y = check_labels(y_true)
    a = check_scores(scores_a, y.size, name="scores_a")
    b = check_scores(scores_b, y.size, name="scores_b")
    if a.shape[0] != 1 or b.shape[0] != 1:
        raise ValueError("delong_test compares two score vectors, each of shape (n,)")
    v10, v01 = _components(y, np.vstack([a, b]))
    aucs = v10.mean(axis=1)
    difference = float(aucs[0] - aucs[1])
    # var(a) + var(b) - 2 cov(a, b), taken as the variance of the differenced components: equal
    # algebraically, but free of cancellation, so identical inputs give exactly 0.
    d10, d01 = v10[:1] - v10[1:], v01[:1] - v01[1:]
    variance = float(_covariance(d10)[0, 0] / d10.shape[1] + _covariance(d01)[0, 0] / d01.shape[1])
    if math.isnan(variance):
        z = p_value = math.nan
    elif variance == 0.0:
        z = 0.0 if difference == 0.0 else math.copysign(math.inf, difference)
        p_value = 1.0 if difference == 0.0 else 0.0
    else:
        z = difference / math.sqrt(variance)
        p_value = float(2.0 * norm.sf(abs(z)))
    return DelongTest(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        difference=difference,
        variance=variance,
        z=z,
        p_value=p_value,
    )
