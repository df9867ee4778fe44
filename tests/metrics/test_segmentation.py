"""Segmentation metrics against independent references: MONAI's own metrics, brute force, hand sums."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance, get_confusion_matrix
from monai.networks.utils import one_hot

from medfed.metrics.segmentation import (
    Count,
    confusion_counts,
    dice_from_counts,
    hd95,
    jaccard_from_counts,
    mean_image_dice,
    pixel_accuracy_from_counts,
    pooled_dice,
    pooled_jaccard,
    summarize,
)

FAST = settings(max_examples=40, deadline=None)


def label_maps(seed: int, shape: tuple[int, ...], num_classes: int, density: float) -> torch.Tensor:
    """Random labels; ``density`` is the chance a pixel is not background (0 and 1 give the
    all-background and no-background edge cases)."""
    rng = np.random.default_rng(seed)
    fg = rng.random(shape) < density
    labels = rng.integers(1, num_classes, shape) if num_classes > 1 else np.zeros(shape, int)
    return torch.as_tensor(np.where(fg, labels, 0))


cases = st.tuples(
    st.integers(0, 2**31 - 1),
    st.sampled_from([(3, 5, 7), (2, 4, 4, 6), (4, 1, 9)]),  # (N, H, W) and one (N, D, H, W)
    st.integers(2, 4),
    st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
    st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
)


def draw(case):
    seed, shape, c, d_pred, d_true = case
    pred = label_maps(seed, shape, c, d_pred)
    target = label_maps(seed + 1, shape, c, d_true)
    return pred, target, c


def monai_scores(metric_cls, pred, target, c, *, include_background, ignore_empty):
    m = metric_cls(
        include_background=include_background, reduction="none", ignore_empty=ignore_empty
    )
    return m(one_hot(pred[:, None], c), one_hot(target[:, None], c)).numpy()


def monai_hd95(pred, target, spacing=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks
        out = compute_hausdorff_distance(
            one_hot(torch.as_tensor(pred).long()[:, None], 2),
            one_hot(torch.as_tensor(target).long()[:, None], 2),
            percentile=95,
            spacing=spacing,
        )
    return out[:, 0].numpy()


# --- counts -------------------------------------------------------------------------------------


def test_hand_computed_3x3():
    # target      pred        class 1: TP (0,1),(1,1)=2  FP (1,0)=1  FN (0,2)=1  TN 9-4=5
    # 0 1 1       0 1 0       class 0: TP (0,0),(1,2),(2,*)=5  FP (0,2)=1  FN (1,0)=1  TN 2
    # 0 1 0       1 1 0       Dice_1 = 4/6, IoU_1 = 2/4, Dice_0 = 10/12, IoU_0 = 5/7
    # 0 0 0       0 0 0       pixel accuracy = (5 + 2) / 9
    target = torch.tensor([[[0, 1, 1], [0, 1, 0], [0, 0, 0]]])
    pred = torch.tensor([[[0, 1, 0], [1, 1, 0], [0, 0, 0]]])
    counts = confusion_counts(pred, target, num_classes=2)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[[5, 1, 1, 2], [2, 1, 1, 5]]]
    np.testing.assert_allclose(dice_from_counts(counts), [[10 / 12, 4 / 6]])
    np.testing.assert_allclose(jaccard_from_counts(counts), [[5 / 7, 2 / 4]])
    np.testing.assert_allclose(pixel_accuracy_from_counts(counts), [7 / 9])
    assert summarize(counts) == pytest.approx(
        {"dice": 4 / 6, "jaccard": 2 / 4, "pixel_acc": 7 / 9, "mean_image_dice": 4 / 6}
    )
    assert [int(c) for c in Count] == [0, 1, 2, 3]
    assert [c.name for c in Count] == ["TP", "FP", "FN", "TN"]


@FAST
@given(cases)
def test_counts_match_monai_and_brute_force(case):
    pred, target, c = draw(case)
    counts = confusion_counts(pred, target, num_classes=c)
    assert counts.shape == (pred.shape[0], c, 4)
    ref = get_confusion_matrix(one_hot(pred[:, None], c), one_hot(target[:, None], c))
    tp, fp, tn, fn = ref.long().unbind(-1)  # MONAI's column order is TP, FP, TN, FN
    assert torch.equal(counts, torch.stack([tp, fp, fn, tn], -1))
    p, t = pred.numpy(), target.numpy()
    for n in range(p.shape[0]):
        for k in range(c):
            pk, tk = p[n] == k, t[n] == k
            expect = [(pk & tk).sum(), (pk & ~tk).sum(), (~pk & tk).sum(), (~pk & ~tk).sum()]
            assert counts[n, k].tolist() == expect


# --- Dice / Jaccard against MONAI ---------------------------------------------------------------


@FAST
@given(cases, st.booleans(), st.booleans())
def test_dice_and_iou_equal_monai(case, include_background, ignore_empty):
    pred, target, c = draw(case)
    counts = confusion_counts(pred, target, num_classes=c)
    first = 0 if include_background else 1
    kw = {"include_background": include_background, "ignore_empty": ignore_empty}
    np.testing.assert_allclose(
        dice_from_counts(counts, ignore_empty=ignore_empty)[:, first:],
        monai_scores(DiceMetric, pred, target, c, **kw),
        rtol=1e-6,
        equal_nan=True,
    )
    np.testing.assert_allclose(
        jaccard_from_counts(counts, ignore_empty=ignore_empty)[:, first:],
        monai_scores(MeanIoU, pred, target, c, **kw),
        rtol=1e-6,
        equal_nan=True,
    )


@pytest.mark.parametrize(
    ("pred_fg", "true_fg", "ignored", "kept"),
    [
        (False, True, 0.0, 0.0),  # empty prediction: a plain miss
        (True, False, math.nan, 0.0),  # empty ground truth, prediction not: NaN or 0
        (False, False, math.nan, 1.0),  # both empty: NaN or 1
        (True, True, 1.0, 1.0),  # all foreground, perfect
    ],
)
def test_empty_cases_follow_monai(pred_fg, true_fg, ignored, kept):
    pred = torch.full((1, 4, 4), int(pred_fg))
    target = torch.full((1, 4, 4), int(true_fg))
    counts = confusion_counts(pred, target, num_classes=2)
    for ignore_empty, expect in ((True, ignored), (False, kept)):
        for fn, metric in ((dice_from_counts, DiceMetric), (jaccard_from_counts, MeanIoU)):
            ours = fn(counts, ignore_empty=ignore_empty)[0, 1]
            ref = monai_scores(
                metric, pred, target, 2, include_background=False, ignore_empty=ignore_empty
            )[0, 0]
            np.testing.assert_equal([ours, ours], [expect, ref])


# --- pooling ------------------------------------------------------------------------------------


@FAST
@given(cases)
def test_pooled_equals_metrics_of_all_images_stitched_together(case):
    pred, target, c = draw(case)
    counts = confusion_counts(pred, target, num_classes=c)
    p, t = pred.numpy().ravel(), target.numpy().ravel()
    for k in range(c):
        inter, sp, st_ = np.sum((p == k) & (t == k)), np.sum(p == k), np.sum(t == k)
        dice = 2 * inter / (sp + st_) if sp + st_ else math.nan
        iou = inter / (sp + st_ - inter) if sp + st_ else math.nan
        np.testing.assert_allclose(pooled_dice(counts)[k], dice, equal_nan=True)
        np.testing.assert_allclose(pooled_jaccard(counts)[k], iou, equal_nan=True)
    assert summarize(counts)["pixel_acc"] == pytest.approx(float(np.mean(p == t)))
    per_image = (pred == target).flatten(1).double().mean(1).numpy()
    np.testing.assert_allclose(pixel_accuracy_from_counts(counts), per_image)


@FAST
@given(cases, st.randoms(use_true_random=False))
def test_summary_is_order_invariant_and_additive_across_sites(case, rnd):
    pred, target, c = draw(case)
    counts = confusion_counts(pred, target, num_classes=c).numpy()
    order = list(range(len(counts)))
    rnd.shuffle(order)
    a, b = summarize(counts), summarize(counts[order])
    assert a.keys() == {"dice", "jaccard", "pixel_acc", "mean_image_dice"}
    np.testing.assert_allclose(list(a.values()), list(b.values()), equal_nan=True)
    # Two "sites" sending their own counts: pooled scores over the sum equal the whole's.
    cut = rnd.randint(0, len(counts))
    sites = np.stack([counts[:cut].sum(0), counts[cut:].sum(0)])
    np.testing.assert_allclose(pooled_dice(sites), pooled_dice(counts), equal_nan=True)
    np.testing.assert_allclose(
        pooled_jaccard(sites[None], axis=(0, 1)), pooled_jaccard(counts), equal_nan=True
    )
    # axis=None: rows already summed (e.g. bootstrap resamples) are scored one by one.
    np.testing.assert_allclose(
        pooled_dice(np.stack([counts.sum(0)] * 3), axis=None),
        np.stack([pooled_dice(counts)] * 3),
        equal_nan=True,
    )


def test_pooled_dice_nan_only_when_absent_everywhere():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    pred = target.clone()
    pred[1, 0, 0] = 2  # class 2 predicted once, never true; class 1 absent everywhere
    counts = confusion_counts(pred, target, num_classes=3)
    d = pooled_dice(counts)
    assert d[2] == 0.0 and math.isnan(d[1]) and d[0] == pytest.approx(2 * 31 / 63)
    assert math.isnan(pooled_jaccard(counts)[1])


@FAST
@given(cases)
def test_mean_image_dice_equals_monai_mean_reduction(case):
    pred, target, c = draw(case)
    counts = confusion_counts(pred, target, num_classes=c)
    ours = mean_image_dice(counts)
    metric = DiceMetric(include_background=False, reduction="mean")
    metric(one_hot(pred[:, None], c), one_hot(target[:, None], c))
    ref = float(metric.aggregate())
    # MONAI reports 0.0 where no image has a defined score; NaN here.
    assert ours == pytest.approx(ref) if not math.isnan(ours) else ref == 0.0
    strict = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    strict(one_hot(pred[:, None], c), one_hot(target[:, None], c))
    summary = summarize(counts)["mean_image_dice"]
    assert summary == pytest.approx(mean_image_dice(counts, ignore_empty=False))
    assert summary == pytest.approx(float(strict.aggregate()))


# --- HD95 ---------------------------------------------------------------------------------------


@FAST
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([(3, 9, 11), (2, 6, 5, 7)]),
    st.sampled_from([0.0, 0.02, 0.2, 0.6, 1.0]),
    st.sampled_from([0.0, 0.02, 0.2, 0.6, 1.0]),
    st.booleans(),
)
def test_hd95_equals_monai(seed, shape, d_pred, d_true, use_spacing):
    pred = label_maps(seed, shape, 2, d_pred)
    target = label_maps(seed + 1, shape, 2, d_true)
    spacing = [0.5, 1.5, 2.0][: len(shape) - 1] if use_spacing else None
    np.testing.assert_allclose(
        hd95(pred, target, spacing=spacing),
        monai_hd95(pred, target, spacing),
        rtol=1e-5,
        equal_nan=True,
    )


def test_hd95_hand_examples_and_empty_cases():
    pred = np.zeros((5, 6, 6), dtype=bool)
    target = np.zeros_like(pred)
    pred[0, 0, 0], target[0, 3, 4] = True, True  # one pixel each: 3-4-5 triangle
    pred[1], target[1] = True, True  # all foreground, identical
    target[2, 1:4, 1:4] = True  # empty prediction
    pred[3, 2, 2] = True  # empty ground truth
    # image 4: both empty
    out = hd95(pred, target)
    np.testing.assert_equal(out, [5.0, 0.0, math.nan, math.nan, math.nan])
    np.testing.assert_equal(out, monai_hd95(pred, target))
    assert hd95(pred, target, spacing=(2.0, 1.0))[0] == pytest.approx(math.sqrt(6**2 + 4**2))
    missed = hd95(pred, target, one_empty=math.inf)
    np.testing.assert_equal(missed[2:], [math.inf, math.inf, math.nan])


def test_hd95_is_max_of_directed_percentiles_not_union():
    # Prediction: a 1x20 row (every pixel is surface); target: its first pixel. pred->target
    # distances are 0..19, target->pred [0]. MONAI's HD95 is the larger directed 95th percentile,
    # 18.05 (linear interpolation); the 95th percentile of the union [0, 0, 1..19] is 18.0.
    pred = np.zeros((1, 3, 22), dtype=bool)
    pred[0, 1, 1:21] = True
    target = np.zeros_like(pred)
    target[0, 1, 1] = True
    assert np.percentile([0, *range(20)], 95) == pytest.approx(18.0)  # the union rule
    assert hd95(pred, target)[0] == pytest.approx(18.05)
    assert monai_hd95(pred, target)[0] == pytest.approx(18.05, rel=1e-6)


# --- errors -------------------------------------------------------------------------------------


def test_errors_name_what_is_wrong():
    a = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"pred \(2, 4, 4\) vs target \(2, 4, 5\)"):
        confusion_counts(a, torch.zeros(2, 4, 5, dtype=torch.long), num_classes=2)
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\), found \[0, 2\]"):
        confusion_counts(a, a + 2 * (torch.arange(4) == 1), num_classes=2)
    with pytest.raises(ValueError, match=r"pred labels must lie in \[0, 3\), found \[-1, 0\]"):
        confusion_counts(a - 1 * (torch.arange(4) == 0), a, num_classes=3)
    with pytest.raises(ValueError, match="integer labels"):
        confusion_counts(a.float(), a, num_classes=2)
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, D, H, W\), got \(4, 4\)"):
        confusion_counts(a[0], a[0], num_classes=2)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        dice_from_counts(np.zeros((2, 3)))
    counts = confusion_counts(a, a, num_classes=3).numpy()
    with pytest.raises(ValueError, match="all classes"):
        pixel_accuracy_from_counts(counts[:, 1:] + np.array([1, 0, 0, 0]) * [[1], [0]])
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        summarize(counts, foreground=[3])
    with pytest.raises(ValueError, match="would sum the TP/FP/FN/TN columns"):
        pooled_dice(counts, axis=-1)
    with pytest.raises(ValueError, match="no foreground"):
        summarize(counts[:, :1])
    with pytest.raises(ValueError, match=r"pred \(2, 4, 4\) vs target \(2, 4\)"):
        hd95(a, a[:, 0])
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=[1.0, 1.0, 1.0])
