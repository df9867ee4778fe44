"""Segmentation metrics from sufficient statistics: per-image, per-class confusion counts.

Why counts: a site must never send masks, but Dice, Jaccard and pixel accuracy are all functions
of four integers per image and class (TP, FP, FN, TN, one class against the rest). A site sends
the ``(N, C, 4)`` count array of its evaluation images; the server computes every metric from
it. Summing counts is exact, so a pooled metric over many sites *is* the metric of the summed
counts -- no weighting by site size, no averaging of averages.

Conventions (fixed here so federated and centralised numbers agree with MONAI):

* **Per-image Dice / Jaccard** (:func:`dice_from_counts`, :func:`jaccard_from_counts`) follow
  ``monai.metrics.DiceMetric`` / ``MeanIoU``. When a class is absent from an image's ground truth
  (TP + FN = 0) the score is undefined; with ``ignore_empty=True`` (MONAI's default) it is NaN
  and drops out of means, with ``ignore_empty=False`` it is 1.0 if the prediction is empty too
  and 0.0 otherwise.
* **Pooled Dice / Jaccard** (:func:`pooled_dice`, :func:`pooled_jaccard`) sum the counts over
  images first. A class absent from the ground truth everywhere but predicted somewhere scores
  0.0 (every predicted pixel is wrong); NaN only when the class is absent from both ground truth
  and prediction everywhere (no evidence either way; 1.0 would flatter a site without lesions).
* **Pixel accuracy** (:func:`pixel_accuracy_from_counts`) is the fraction of pixels whose label
  is right: sum over classes of TP divided by the number of pixels. That needs the counts of
  *all* classes of a label map (each pixel is a TP of exactly one class iff it is right), so it
  reduces the class axis and refuses count sets whose per-class totals disagree.
* **HD95** (:func:`hd95`) matches ``monai.metrics.compute_hausdorff_distance(percentile=95)``:
  surface = foreground pixels removed by a binary erosion (cross-shaped element, outside the
  image counts as background), exact Euclidean distances (``spacing``-scaled), the 95th
  percentile (linear interpolation) of each directed set of surface distances, and the larger of
  the two directions. Note: MONAI takes the maximum of the two directed percentiles, *not* the
  percentile of their union; so does this function. Empty cases as MONAI: NaN whenever either
  mask is empty. (With one mask empty MONAI's directed distances are all ``inf`` and
  ``torch.quantile`` of infinities is NaN; its plain, 100th-percentile-free HD gives ``inf``.)
  A NaN drops out of a ``nanmean``, which would hide a missed lesion, so ``one_empty=`` lets a
  caller score "exactly one empty" as ``inf`` or a penalty instead; both-empty stays NaN. Unlike
  counts, HD95 is not decomposable: a site reports per-image values, never surfaces.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "Count",
    "confusion_counts",
    "dice_from_counts",
    "hd95",
    "jaccard_from_counts",
    "mean_image_dice",
    "pixel_accuracy_from_counts",
    "pooled_dice",
    "pooled_jaccard",
    "summarize",
]

SUMMARY_KEYS = ("dice", "jaccard", "pixel_acc", "mean_image_dice")
"""The keys of :func:`summarize`, in order."""

Axes = int | tuple[int, ...] | None
"""Axes of a count array to sum over before scoring (``None``: already summed)."""


class Count(enum.IntEnum):
    """Column order of the last axis of a count array."""

    TP = 0
    FP = 1
    FN = 2
    TN = 3


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """Per-image, per-class one-vs-rest counts of integer label maps.

    ``pred`` and ``target`` have shape ``(N, H, W)`` or ``(N, D, H, W)`` and hold labels in
    ``[0, num_classes)``. Returns an int64 tensor ``(N, num_classes, 4)`` with columns
    :class:`Count` (TP, FP, FN, TN), on the inputs' device.

    One ``bincount`` over ``(image, true, predicted)`` triples builds every image's C x C
    confusion matrix at once; the one-vs-rest counts are its diagonal and row/column sums. No
    Python loop over images or classes: evaluation of many tiles stays cheap on 2 cores.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
        )
    if pred.ndim not in (3, 4):
        raise ValueError(
            f"expected label maps of shape (N, H, W) or (N, D, H, W), got {tuple(pred.shape)}"
        )
    for what, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"{what} must hold integer labels, got dtype {t.dtype}")
    pred, target = pred.long(), target.long()
    for what, t in (("pred", pred), ("target", target)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(
                f"{what} labels must lie in [0, {num_classes}), found "
                f"[{int(t.min())}, {int(t.max())}] in shape {tuple(t.shape)}"
            )
    n, c = pred.shape[0], num_classes
    pixels = pred[0].numel() if n else 0
    image = torch.arange(n, device=pred.device).unsqueeze(1)
    index = (image * c + target.reshape(n, -1)) * c + pred.reshape(n, -1)
    cm = torch.bincount(index.reshape(-1), minlength=n * c * c).reshape(n, c, c)  # [n, true, pred]
    tp = cm.diagonal(dim1=1, dim2=2)
    fp = cm.sum(dim=1) - tp
    fn = cm.sum(dim=2) - tp
    tn = pixels - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=-1).to(torch.int64)


def _counts(counts: np.ndarray | torch.Tensor, *, min_ndim: int = 1) -> np.ndarray:
    a = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if a.ndim < min_ndim or a.shape[-1] != len(Count):
        raise ValueError(
            f"counts must have shape (..., 4) with at least {min_ndim} axes "
            f"(columns TP, FP, FN, TN), got {a.shape}"
        )
    if np.any(a < 0):
        raise ValueError("counts must be non-negative")
    return a.astype(np.float64)


def _overlap(a: np.ndarray, *, dice: bool, empty: str) -> np.ndarray:
    """Dice (2TP / (2TP+FP+FN)) or Jaccard (TP / (TP+FP+FN)) with an empty-case rule.

    ``empty``: "ignore" (GT empty -> NaN), "one" (GT empty -> 1 if prediction empty else 0),
    "pooled" (NaN only when GT and prediction are both empty).
    """
    tp, fp, fn = a[..., Count.TP], a[..., Count.FP], a[..., Count.FN]
    num = 2 * tp if dice else tp
    den = num + fp + fn
    both_empty = den == 0
    out = np.divide(num, den, out=np.zeros_like(num), where=~both_empty)
    if empty == "ignore":
        out[tp + fn == 0] = np.nan
    elif empty == "one":
        out[both_empty] = 1.0
    else:
        out[both_empty] = np.nan
    return out


def dice_from_counts(counts: np.ndarray | torch.Tensor, *, ignore_empty: bool = True) -> np.ndarray:
    """Dice of every count row: shape ``counts.shape[:-1]``, e.g. ``(N, C)`` per image and class.

    Empty ground truth follows MONAI's ``DiceMetric``: NaN with ``ignore_empty=True``, else 1.0
    when the prediction is empty too and 0.0 otherwise.
    """
    return _overlap(_counts(counts), dice=True, empty="ignore" if ignore_empty else "one")


def jaccard_from_counts(
    counts: np.ndarray | torch.Tensor, *, ignore_empty: bool = True
) -> np.ndarray:
    """Jaccard (IoU) of every count row, with MONAI ``MeanIoU``'s empty-ground-truth rule."""
    return _overlap(_counts(counts), dice=False, empty="ignore" if ignore_empty else "one")


def _pool(counts: np.ndarray | torch.Tensor, axis: Axes) -> np.ndarray:
    a = _counts(counts)
    if axis is None:
        return a
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if any(ax % a.ndim == a.ndim - 1 for ax in axes):
        raise ValueError(f"axis {axis} would sum the TP/FP/FN/TN columns of counts {a.shape}")
    return a.sum(axis=axes)


def pooled_dice(counts: np.ndarray | torch.Tensor, *, axis: Axes = 0) -> np.ndarray:
    """Dice of counts summed over ``axis`` first: ``(N, C, 4) -> (C,)`` by default.

    Equals the Dice of all images stitched into one; NaN only for a class absent from both
    ground truth and prediction everywhere. ``axis=(0, 1)`` pools ``(sites, N, C, 4)``;
    ``axis=None`` scores counts that are already summed (e.g. bootstrap resamples ``(R, C, 4)``)
    row by row under this pooled empty rule.
    """
    return _overlap(_pool(counts, axis), dice=True, empty="pooled")


def pooled_jaccard(counts: np.ndarray | torch.Tensor, *, axis: Axes = 0) -> np.ndarray:
    """Jaccard of counts summed over ``axis`` first; NaN and ``axis`` as :func:`pooled_dice`."""
    return _overlap(_pool(counts, axis), dice=False, empty="pooled")


def pixel_accuracy_from_counts(counts: np.ndarray | torch.Tensor) -> np.ndarray:
    """Fraction of correctly labelled pixels: ``(..., C, 4) -> (...)``.

    ``counts`` must hold *every* class of the label maps (as :func:`confusion_counts` returns):
    a pixel is right iff it is a TP of its class, so accuracy = sum_c TP_c / pixels. Pass
    per-image counts ``(N, C, 4)`` for per-image accuracy, or counts summed over images
    (``counts.sum(0)``) for the pooled, pixel-weighted accuracy. NaN for zero pixels.
    """
    a = _counts(counts, min_ndim=2)
    totals = a.sum(axis=-1)  # (..., C): pixels seen by each class's one-vs-rest split
    if not np.all(totals == totals[..., :1]):
        raise ValueError(
            "per-class pixel totals (TP+FP+FN+TN) differ: pixel accuracy needs the counts of "
            "all classes of one label map"
        )
    pixels = totals[..., 0]
    correct = a[..., Count.TP].sum(axis=-1)
    return np.divide(correct, pixels, out=np.full_like(correct, np.nan), where=pixels > 0)


def _nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``np.nanmean`` that returns NaN for all-NaN slices without a RuntimeWarning."""
    valid = ~np.isnan(x)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    n = valid.sum(axis=axis)
    return np.divide(total, n, out=np.full_like(total, np.nan, dtype=np.float64), where=n > 0)


def _foreground(num_classes: int, foreground: Sequence[int] | None) -> list[int]:
    fg = list(range(1, num_classes)) if foreground is None else [int(c) for c in foreground]
    if not fg:
        raise ValueError(
            f"no foreground classes to average over (num_classes={num_classes}, "
            f"foreground={foreground}); pass foreground=[0] to score class 0"
        )
    bad = [c for c in fg if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"foreground classes {bad} are outside [0, {num_classes})")
    return fg


def mean_image_dice(
    counts: np.ndarray | torch.Tensor,
    *,
    foreground: Sequence[int] | None = None,
    ignore_empty: bool = True,
) -> float:
    """MONAI's ``DiceMetric(reduction="mean")``: per image, the mean over its non-NaN foreground
    classes; then the mean over images that have one. ``counts`` is ``(N, C, 4)``.

    With the default foreground (classes 1..C-1) this equals ``DiceMetric(include_background=
    False)``. One difference: when no image has a defined score MONAI reports 0.0, this NaN.
    """
    a = _counts(counts, min_ndim=3)
    if a.ndim != 3:
        raise ValueError(f"counts must have shape (N, C, 4), got {a.shape}")
    fg = _foreground(a.shape[1], foreground)
    per_image = _nanmean(dice_from_counts(a[:, fg], ignore_empty=ignore_empty), axis=1)
    return float(_nanmean(per_image))


def summarize(
    counts: np.ndarray | torch.Tensor, *, foreground: Sequence[int] | None = None
) -> dict[str, float]:
    """The evaluation summary of ``(N, C, 4)`` counts (one site, or several concatenated).

    * ``dice`` / ``jaccard``: pooled per-class scores, averaged over the foreground classes
      (default 1..C-1) so every structure counts the same however small it is.
    * ``pixel_acc``: pooled pixel accuracy over *all* classes (it is undefined for a subset).
    * ``mean_image_dice``: :func:`mean_image_dice` with ``ignore_empty=False`` (MONAI's
      ``DiceMetric(ignore_empty=False)``): a normal image scores 1 if left empty and 0 for a false
      alarm. Ignoring empty images would hide false alarms on normal tissue, and every image having
      a value is what lets sites pool the mean as a plain sum and studies pair images in a test.

    Pooled scores are order-invariant and additive across sites: summarising the concatenated
    counts of all sites equals summarising their sum.
    """
    a = _counts(counts, min_ndim=3)
    if a.ndim != 3:
        raise ValueError(f"counts must have shape (N, C, 4), got {a.shape}")
    fg = _foreground(a.shape[1], foreground)
    pooled = a.sum(axis=0)
    return {
        "dice": float(_nanmean(pooled_dice(pooled, axis=None)[fg])),
        "jaccard": float(_nanmean(pooled_jaccard(pooled, axis=None)[fg])),
        "pixel_acc": float(pixel_accuracy_from_counts(pooled)),
        "mean_image_dice": mean_image_dice(a, foreground=fg, ignore_empty=False),
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background neighbour (face connectivity; outside = background)."""
    return mask & ~ndimage.binary_erosion(mask)


def _directed_percentile(
    src: np.ndarray, dst: np.ndarray, spacing: Sequence[float] | None, q: float
) -> float:
    """q-th percentile of the distances from each ``src`` surface pixel to the ``dst`` surface."""
    dist = ndimage.distance_transform_edt(~dst, sampling=spacing)
    return float(np.percentile(np.asarray(dist)[src], q))


def hd95(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    *,
    spacing: float | Sequence[float] | None = None,
    one_empty: float = math.nan,
) -> np.ndarray:
    """95th-percentile Hausdorff distance per image of binary masks ``(N, H, W[, D])``.

    Nonzero = foreground. ``spacing`` (one number, or one per spatial axis) scales distances to
    physical units; ``None`` means unit spacing. Returns float64 ``(N,)``: NaN where both masks
    are empty, ``one_empty`` where exactly one is (default NaN, as MONAI; ``math.inf`` or the
    image diagonal make a missed or hallucinated object count as a failure). See the module
    docstring for the definition shared with ``monai.metrics.compute_hausdorff_distance``.
    """
    p = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    t = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: pred {p.shape} vs target {t.shape}")
    if p.ndim not in (3, 4):
        raise ValueError(f"expected masks of shape (N, H, W) or (N, D, H, W), got {p.shape}")
    ndim = p.ndim - 1
    sampling: list[float] | None = None
    if spacing is not None:
        if isinstance(spacing, (int, float, np.integer, np.floating)):
            sampling = [float(spacing)] * ndim
        else:
            sampling = [float(s) for s in spacing]
        if len(sampling) != ndim or min(sampling) <= 0:
            raise ValueError(
                f"spacing must be positive, one per spatial axis ({ndim}), got {spacing}"
            )
    out = np.empty(p.shape[0], dtype=np.float64)
    for i, (pi, ti) in enumerate(zip(p != 0, t != 0, strict=True)):
        if not pi.any() and not ti.any():
            out[i] = np.nan
            continue
        if not pi.any() or not ti.any():
            out[i] = one_empty
            continue
        # Crop to the union's bounding box: every surface pixel and its nearest partner lie
        # inside it, so distances are unchanged and 3-D volumes cost what their objects cost.
        box = ndimage.find_objects((pi | ti).astype(np.int8))[0]
        ps, ts = _surface(pi[box]), _surface(ti[box])
        out[i] = max(
            _directed_percentile(ps, ts, sampling, 95.0),
            _directed_percentile(ts, ps, sampling, 95.0),
        )
    return out
