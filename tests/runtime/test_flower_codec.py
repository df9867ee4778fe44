"""The wire format: lossless for parameters, and a pooled AUC without per-case scores."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medfed.runtime.flower.codec import (
    HIST_BINS,
    pooled_auc,
    score_histograms,
    update_content,
    update_from_content,
)
from medfed.types import ParamKind, Update


def test_update_round_trips_exactly_with_dtypes_and_extras():
    u = Update(
        site="site2",
        params={
            "w": torch.randn(3, 4),
            "bn.num_batches_tracked": torch.tensor(7),
            "h": torch.randn(2).to(torch.bfloat16),
        },
        kind=ParamKind.DELTA,
        num_examples=41,
        metrics={"train_loss": 0.25, "steps": 3.0},
        extras={"delta_c": {"w": torch.randn(3, 4)}},
    )
    back = update_from_content("site2", update_content(u))
    assert back.kind is ParamKind.DELTA and back.num_examples == 41
    assert back.metrics == u.metrics
    for k, v in u.params.items():
        assert back.params[k].dtype == v.dtype and torch.equal(back.params[k], v)
    assert torch.equal(back.extras["delta_c"]["w"], u.extras["delta_c"]["w"])


def test_pooled_auc_from_site_histograms_equals_sklearn_on_binned_scores():
    rng = np.random.default_rng(0)
    hists, ys, ss = {}, [], []
    for site in range(3):
        y = rng.integers(0, 2, 300)
        # scores on bin centres, so binning loses nothing and the reference is exact
        b = rng.integers(0, HIST_BINS, 300)
        b = np.where(y == 1, np.minimum(b + HIST_BINS // 5, HIST_BINS - 1), b)
        s = (b + 0.5) / HIST_BINS
        hists[f"s{site}"] = score_histograms(y, s)
        ys.append(y)
        ss.append(s)
    assert pooled_auc(hists) == pytest.approx(roc_auc_score(np.concatenate(ys), np.concatenate(ss)))


def test_pooled_auc_of_one_class_is_nan():
    assert np.isnan(pooled_auc({"a": score_histograms(np.ones(5, int), np.linspace(0, 1, 5))}))
