"""Splits as pure functions of (labels, seed): deterministic, stratified, covering every index once."""

from __future__ import annotations

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
