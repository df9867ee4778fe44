"""Splits as pure functions of (labels, seed): deterministic, stratified, covering every index once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def stratified_split(
    labels: np.ndarray, *, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_idx, val_idx) with each class split in the same proportion.

    Each class contributes round(n_c * val_fraction) validation cases (at least one when the class
    has two or more cases), so small sites still validate on both classes.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.array([], dtype=np.int64)
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.array([], dtype=np.int64)
    return train.astype(np.int64), val.astype(np.int64)


def stratified_group_split(
    labels: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_idx, val_idx) with no group (patient) on both sides, stratified by class.

    Cases of one patient are correlated (same anatomy, scanner, session), so a case-level split
    leaks: validation would score partly on patients the model trained on. Splitting whole groups
    removes the leak; the price is that class shares can only be matched approximately.

    Choice of stratification: greedy assignment on per-group class *counts* rather than a majority
    label per group, because a patient with cases of several classes then counts towards every
    class it carries. Groups are shuffled by ``seed`` and visited largest first (big groups are
    placed while there is room, small ones fine-tune); a group goes to validation when that brings
    the per-class validation counts closer to ``n_c * val_fraction``, measured as the sum over
    classes of the squared *relative* deviation, so a rare class weighs as much as a common one.
    A local search then flips single groups while any flip strictly lowers that cost (greedy
    choices were made against the counts of their moment; revisiting them cuts the worst per-class
    deviation several-fold on patient-sized groups). With one case per group this reduces to a
    per-class stratified split (validation count within one case of ``round(n_c * val_fraction)``).

    A repair pass then moves single groups so that, where possible, every class carried by two or
    more groups appears on both sides (a class with no validation case cannot be evaluated, one
    with no training case cannot be learned), and both sides are non-empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    group_arr = np.asarray(groups)
    if labels.ndim != 1 or group_arr.ndim != 1 or len(labels) != len(group_arr):
        raise ValueError(
            f"labels and groups must be 1-D and of equal length, got shapes {labels.shape} "
            f"and {group_arr.shape}"
        )
    group_names, group_of = np.unique(group_arr, return_inverse=True)
    n_groups = len(group_names)
    if n_groups < 2:
        raise ValueError(
            f"a group split needs at least 2 distinct groups (patients), got {n_groups}: "
            "with one patient there is nothing to hold out without leaking"
        )
    _, class_of = np.unique(labels, return_inverse=True)
    n_classes = int(class_of.max()) + 1
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (group_of, class_of), 1)
    class_sizes = counts.sum(axis=0).astype(float)
    target = class_sizes * val_fraction

    def cost(val_counts: np.ndarray) -> np.ndarray:
        return np.sum(((val_counts - target) / class_sizes) ** 2, axis=-1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    in_val = np.zeros(n_groups, dtype=bool)
    val_counts = np.zeros(n_classes, dtype=np.int64)
    for g in order:
        candidate = val_counts + counts[g]
        if cost(candidate) < cost(val_counts):
            in_val[g] = True
            val_counts = candidate

    # Greedy decisions were taken against the counts of their moment; revisit them with single
    # moves while any strictly improves (each move lowers the cost, so this terminates).
    for _ in range(n_groups):
        sign = np.where(in_val, -1, 1)[:, None]
        new_cost = cost(val_counts + sign * counts)
        best = int(np.argmin(new_cost))
        if not new_cost[best] < cost(val_counts):
            break
        in_val[best] = not in_val[best]
        val_counts = val_counts + sign[best] * counts[best]

    in_val = _repair_sides(in_val, counts, cost)
    idx_val = np.flatnonzero(in_val[group_of]).astype(np.int64)
    idx_train = np.flatnonzero(~in_val[group_of]).astype(np.int64)
    return idx_train, idx_val


def _repair_sides(
    in_val: np.ndarray, counts: np.ndarray, cost: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Move single groups so every class with >= 2 groups, and each side, is non-empty.

    Each move is the one that leaves the fewest uncovered classes, then the lowest cost; the pass
    stops when nothing is uncovered or no single move helps (the "if possible" of the contract).
    All single moves are scored at once from per-group deltas, in O(groups x classes).
    """
    in_val = in_val.copy()
    has = (counts > 0).astype(np.int64)
    eligible = has.sum(axis=0) >= 2
    n_groups = len(in_val)

    def violations(val_groups: np.ndarray, n_val: np.ndarray) -> np.ndarray:
        train_groups = has.sum(axis=0) - val_groups
        uncovered = ((val_groups == 0) | (train_groups == 0)) & eligible
        return uncovered.sum(axis=-1) + (n_val == 0) + (n_val == n_groups)

    for _ in range(counts.shape[1] + 2):
        val_groups = has[in_val].sum(axis=0)
        n_val = np.asarray(in_val.sum())
        current = int(violations(val_groups, n_val))
        if current == 0:
            break
        sign = np.where(in_val, -1, 1)[:, None]  # flipping a val group removes it from val
        new_violations = violations(val_groups + sign * has, n_val + sign[:, 0])
        new_cost = cost(counts[in_val].sum(axis=0) + sign * counts)
        best = int(np.lexsort((new_cost, new_violations))[0])
        if new_violations[best] >= current:
            break
        in_val[best] = not in_val[best]
    return in_val
