"""Per-round histories (``history.jsonl``) as the learning-curve figures need them.

Histories are the one soft input of the report: a run that recorded none, or a file cut short by
an interrupted run, still deserves a report, so nothing here raises on content. Three row layouts
are read:

- old classification rows: ``val_auc``/``val_acc`` and ``external_auc``/``external_acc``;
- new classification rows: the same, plus ``val: {"auc", "acc"}`` and ``external: {...} | null``;
- segmentation rows: ``val: {"dice", "jaccard", "pixel_acc", "mean_image_dice"}``, ``external``
  likewise (or null), and ``val_auc``/``external_auc`` null.

Any row may carry ``privacy: {"max_epsilon", ...}`` (a DP run), read as the ε spent so far.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LEGACY = ("auc", "acc")
"""Metrics the old rows carried as flat ``<split>_<metric>`` keys."""


@dataclass(frozen=True)
class RoundPoint:
    """One round of one run: validation scores by metric name, and the mean training loss."""

    round: int
    val: Mapping[str, float]
    external: Mapping[str, float]
    train_loss: float | None
    epsilon: float | None = None
    """ε spent so far by the most-exposed site (DP runs only)."""

    def score(self, split: str, metric: str) -> float | None:
        """``split`` is ``"val"`` (internal validation) or ``"external"``; ``None`` if unrecorded."""
        return (self.val if split == "val" else self.external).get(metric)

    @property
    def val_auc(self) -> float | None:
        return self.val.get("auc")

    @property
    def external_auc(self) -> float | None:
        return self.external.get("auc")


def finite(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)
    return float(v) if ok else None


def _scores(row: Mapping[str, Any], split: str) -> dict[str, float]:
    """The ``split`` dict of a new row, completed by the flat keys of an old one."""
    block = row.get(split)
    out = {
        str(k): x
        for k, v in (block.items() if isinstance(block, Mapping) else ())
        if (x := finite(v)) is not None
    }
    for metric in LEGACY:
        if metric not in out and (x := finite(row.get(f"{split}_{metric}"))) is not None:
            out[metric] = x
    return out


def _train_loss(row: Mapping[str, Any]) -> float | None:
    """Example-weighted mean over sites; unweighted when no site reports its example count."""
    sites = row.get("sites")
    losses: list[tuple[float, float]] = []
    for s in sites.values() if isinstance(sites, Mapping) else ():
        if isinstance(s, Mapping) and (x := finite(s.get("train_loss"))) is not None:
            losses.append((x, finite(s.get("examples")) or 0))
    weight = sum(w for _, w in losses)
    if weight:
        return float(sum(x * w for x, w in losses) / weight)
    return float(np.mean([x for x, _ in losses])) if losses else None


def parse_round(row: Mapping[str, Any], index: int) -> RoundPoint:
    """``index`` stands in for a missing ``round`` field (rows are written in round order)."""
    number = finite(row.get("round"))
    privacy = row.get("privacy")
    return RoundPoint(
        round=int(number) if number is not None else index,
        val=_scores(row, "val"),
        external=_scores(row, "external"),
        train_loss=_train_loss(row),
        epsilon=finite(privacy.get("max_epsilon")) if isinstance(privacy, Mapping) else None,
    )


def read_history(path: Path) -> tuple[RoundPoint, ...] | None:
    """The rounds in ``path``; ``None`` when the file is missing or holds no readable row."""
    if not path.is_file():
        return None
    points: list[RoundPoint] = []
    for text in path.read_text().splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue  # a half-written last line from an interrupted run
        if isinstance(row, Mapping):
            points.append(parse_round(row, len(points)))
    return tuple(points) or None
