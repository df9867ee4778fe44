"""Classification metrics computed from scores and labels (what a site may share: no images)."""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (scipy's ``rankdata``, without its overhead,
    which dominated per-site evaluation of many small sites)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Returns NaN when only one class is present: the AUC is undefined there, and a number would lie.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multiclass_auc(labels: np.ndarray, proba: np.ndarray) -> float:
    """Binary AUC on P(class 1); macro one-vs-rest AUC for more classes."""
    proba = np.asarray(proba)
    if proba.ndim == 1:
        return roc_auc(labels, proba)
    if proba.shape[1] == 2:
        return roc_auc(labels, proba[:, 1])
    aucs = [roc_auc(np.asarray(labels) == c, proba[:, c]) for c in range(proba.shape[1])]
    valid = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan")


def accuracy(labels: np.ndarray, proba: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    return float((np.asarray(proba).argmax(axis=1) == labels).mean())
