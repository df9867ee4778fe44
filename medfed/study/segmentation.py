"""A segmentation study's numbers: Dice, Jaccard and pixel accuracy with bootstrap CIs, and paired
Wilcoxon signed-rank tests on per-image Dice.

Everything works from per-image confusion counts of the foreground classes (what a site may send;
``segmentation.csv`` holds them), so the statistics can be recomputed from that file alone.

Conventions: pooled Dice/Jaccard come from the counts summed over a split's images (large lesions
weigh more, empty images cannot produce NaN); per-image Dice follows MONAI's
``ignore_empty=False``: an image with no foreground in truth and prediction scores 1, a false
alarm on such an image 0. The paired test uses those per-image values, so a model that hallucinates
lesions on normal tissue is penalised there too.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from medfed.metrics.segmentation import (
    Count,
    dice_from_counts,
    pixel_accuracy_from_counts,
    pooled_dice,
    pooled_jaccard,
)
from medfed.study.stats import (
    ModelKey,
    Split,
    bootstrap_seed,
    paired_models,
    report_splits,
)
from medfed.types import Paradigm

METRICS = ("dice", "jaccard", "pixel_acc")
CSV_COLUMNS = ("network", "paradigm", "split", "site", "case_id", "tp", "fp", "fn", "tn", "dice")


@dataclass(frozen=True)
class SegScores:
    """One model's per-image results on one split, in an order shared by every model."""

    sites: tuple[str, ...]
    case_ids: tuple[str, ...]
    counts: np.ndarray  # int64 (n, C, 4): TP, FP, FN, TN per image and class
    hd95: np.ndarray | None = None  # float (n,), foreground HD95 in pixels; NaN where undefined

    def __post_init__(self) -> None:
        n = len(self.counts)
        if not (len(self.sites) == len(self.case_ids) == n) or self.counts.ndim != 3:
            raise ValueError("sites, case_ids and counts (n, C, 4) must have one entry per image")
        if self.hd95 is not None and len(self.hd95) != n:
            raise ValueError("hd95 must have one entry per image")

    @property
    def foreground(self) -> np.ndarray:
        """(n, F, 4): the classes that are not background (all of them if there is only one)."""
        return self.counts[:, 1:] if self.counts.shape[1] > 1 else self.counts

    def image_dice(self) -> np.ndarray:
        """Per-image Dice averaged over foreground classes (MONAI's ``ignore_empty=False``)."""
        return np.asarray(dice_from_counts(self.foreground, ignore_empty=False)).mean(axis=1)

    def __len__(self) -> int:
        return len(self.counts)

    def where_site(self, site: str) -> SegScores:
        idx = np.flatnonzero([s == site for s in self.sites])
        return SegScores(
            sites=tuple(self.sites[i] for i in idx),
            case_ids=tuple(self.case_ids[i] for i in idx),
            counts=self.counts[idx],
            hd95=None if self.hd95 is None else self.hd95[idx],
        )


SegPredictions = Mapping[ModelKey, Mapping[Split, SegScores]]


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _class_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the last (class) axis of the defined values; NaN, silently, if none is."""
    ok = np.isfinite(x)
    n = ok.sum(axis=-1)
    total = np.where(ok, x, 0.0).sum(axis=-1)
    return np.divide(total, n, out=np.full(total.shape, np.nan), where=n > 0)


def _pooled(summed: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of counts summed over images, (..., C, 4) with every class; Dice and Jaccard are
    averaged over the foreground classes, pixel accuracy needs them all."""
    fg = summed[..., 1:, :] if summed.shape[-2] > 1 else summed
    return {
        "dice": _class_mean(pooled_dice(fg, axis=None)),
        "jaccard": _class_mean(pooled_jaccard(fg, axis=None)),
        "pixel_acc": np.asarray(pixel_accuracy_from_counts(summed)),
    }


def split_metrics(data: SegScores, *, resamples: int, level: float, seed: int) -> dict[str, Any]:
    """Pooled Dice, Jaccard, pixel accuracy and mean per-image Dice, each with a bootstrap CI.

    The bootstrap resamples images (the unit a site contributes) with replacement; each resample
    is a row of multinomial weights, so all of them cost one matrix product over the counts.
    """
    counts = data.counts.astype(np.float64)
    n = len(counts)
    out: dict[str, Any] = {"n": n, "n_pixels": int(data.counts[:, 0].sum(axis=-1).sum())}
    if n == 0:
        return out
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    point = _pooled(counts.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = _pooled((weights @ counts.reshape(n, -1)).reshape(resamples, *counts.shape[1:]))
    per_image = {"mean_image_dice": data.image_dice()}
    if data.hd95 is not None:
        per_image["hd95"] = data.hd95
    alpha = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):
        for name, values in per_image.items():
            ok = np.isfinite(values)
            point[name] = np.asarray(values[ok].mean() if ok.any() else np.nan)
            w = weights[:, ok]
            boot[name] = (w @ values[ok]) / np.where(w.sum(axis=1) > 0, w.sum(axis=1), np.nan)
    for name, est in point.items():
        samples = boot[name][np.isfinite(boot[name])]
        lo, hi = np.quantile(samples, [alpha, 1 - alpha]) if len(samples) else (np.nan, np.nan)
        out[name] = _num(float(est))
        out[f"{name}_ci"] = [_num(float(lo)), _num(float(hi))]
    return out


def model_results(
    network: str,
    paradigm: str,
    splits: Mapping[Split, SegScores],
    *,
    site_names: Sequence[str],
    resamples: int,
    level: float,
    seed: int,
) -> dict[str, dict[str, Any]]:
    return {
        name: split_metrics(
            data,
            resamples=resamples,
            level=level,
            seed=bootstrap_seed(seed, network, paradigm, name),
        )
        for name, data in report_splits(splits, site_names=site_names)
    }


def wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, float | None]:
    """Signed-rank statistic and two-sided p; no p when every pair is tied (nothing to test)."""
    if len(a) == 0 or np.allclose(a, b):
        return 0.0, None
    res = sps.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), _num(float(res.pvalue))


def comparisons(predictions: SegPredictions, *, networks: Sequence[str]) -> list[dict[str, Any]]:
    """Federated vs centralized and vs each local model: per-image Dice, paired on the images."""
    out: list[dict[str, Any]] = []
    for network, split, other, a, b in paired_models(predictions, networks=networks):
        dice_a, dice_b = a.image_dice(), b.image_dice()
        statistic, p = wilcoxon(dice_a, dice_b)
        out.append(
            {
                "network": network,
                "split": str(split),
                "a": str(Paradigm.FEDERATED),
                "b": other,
                "metric": "image_dice",
                "test": "wilcoxon",
                "n": len(dice_a),
                "mean_a": float(dice_a.mean()),
                "mean_b": float(dice_b.mean()),
                "difference": float(dice_a.mean() - dice_b.mean()),
                "statistic": statistic,
                "p_value": p,
            }
        )
    return out


def write_counts(path: Path, predictions: SegPredictions) -> None:
    """``segmentation.csv``: the first foreground class's counts and per-image Dice (for binary
    masks, everything :func:`read_counts` needs to recompute the statistics)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for (network, paradigm), splits in predictions.items():
            for split, data in splits.items():
                fg = data.foreground[:, 0]
                for site, case, row, dice in zip(
                    data.sites, data.case_ids, fg, data.image_dice(), strict=True
                ):
                    writer.writerow(
                        [
                            network,
                            paradigm,
                            str(split),
                            site,
                            case,
                            *map(int, row),
                            repr(float(dice)),
                        ]
                    )


def read_counts(path: Path) -> dict[ModelKey, dict[Split, SegScores]]:
    """The inverse of :func:`write_counts` for one foreground class; errors name the line."""
    rows: dict[tuple[str, str, Split], list[tuple[str, str, list[int]]]] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = sorted(set(CSV_COLUMNS) - set(reader.fieldnames or ()))
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        for line, row in enumerate(reader, start=2):
            try:
                key = (row["network"], row["paradigm"], Split(row["split"]))
                counts = [int(row[c]) for c in ("tp", "fp", "fn", "tn")]
            except ValueError as err:
                raise ValueError(f"{path}, line {line}: {err}") from None
            rows.setdefault(key, []).append((row["site"], row["case_id"], counts))
    out: dict[ModelKey, dict[Split, SegScores]] = {}
    for (network, paradigm, split), items in rows.items():
        sites, cases, rows_counts = zip(*items, strict=True)
        fg = np.asarray(rows_counts, dtype=np.int64)
        # Binary masks: the background's counts are the foreground's, roles swapped.
        bg = fg[:, [Count.TN, Count.FN, Count.FP, Count.TP]]
        out.setdefault((network, paradigm), {})[split] = SegScores(
            sites=tuple(sites), case_ids=tuple(cases), counts=np.stack([bg, fg], axis=1)
        )
    return out
