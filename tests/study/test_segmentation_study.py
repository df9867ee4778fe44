"""A segmentation study on a tiny federation: results that agree with scipy and MONAI, overlays,
resume, and the report."""

import csv
import json

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from scipy.stats import wilcoxon

from medfed.study import StudyError, build_study_config, run_study
from medfed.study.segmentation import SegScores, read_counts, split_metrics
from medfed.study.stats import Split
from tests.conftest import make_federation, make_seg_federation

pytestmark = pytest.mark.slow

RAW = {
    "name": "tiny-seg-study",
    "task": "segmentation",
    "device": "cpu",
    "networks": [{"label": "UNet", "model": {"name": "medfed:smallunet"}}],
    "budget": {"pooled_epochs": 6},
    "federation": {"rounds": 3, "min_clients": 2},
    "train": {"batch_size": 8, "optimizer": "adam", "lr": 0.01},
    "stats": {"bootstrap_resamples": 200, "hd95": True, "overlays_per_site": 2},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("segstudy")
    fed = make_seg_federation(3, n=24, size=16)
    result = run_study(build_study_config(RAW), out_dir=out, federation=fed, progress=False)
    return result, fed


def test_results_have_dice_jaccard_pixel_accuracy_with_cis(study):
    result, fed = study
    doc = json.loads((result.out_dir / "results.json").read_text())
    meta = doc["meta"]
    assert meta["task"] == "segmentation" and meta["metrics"] == ["dice", "jaccard", "pixel_acc"]
    assert "threshold_rule" not in meta
    paradigms = ["centralized", "federated", "local:site0", "local:site1", "local:site2"]
    assert list(doc["UNet"]) == paradigms
    for p in paradigms:
        splits = doc["UNet"][p]
        assert set(splits) == {"internal", "external", "site:site0", "site:site1", "site:site2"}
        m = splits["internal"]
        assert m["n"] == sum(len(s.val) for s in fed.sites)
        assert m["n_pixels"] == m["n"] * 16 * 16
        for key in ("dice", "jaccard", "pixel_acc", "mean_image_dice", "hd95"):
            lo, hi = m[f"{key}_ci"]
            if m[key] is not None:
                assert lo <= m[key] <= hi, (p, key)
        # Jaccard = Dice / (2 - Dice) on the same pooled counts
        assert m["jaccard"] == pytest.approx(m["dice"] / (2 - m["dice"]), abs=1e-9)
    # the federation learns the squares
    assert doc["UNet"]["federated"]["internal"]["dice"] > 0.5
    assert not (result.out_dir / "predictions.csv").exists()


def test_pooled_dice_matches_monai_on_the_written_counts(study):
    result, _ = study
    preds = read_counts(result.out_dir / "segmentation.csv")
    doc = json.loads((result.out_dir / "results.json").read_text())
    for (net, paradigm), splits in preds.items():
        counts = splits[Split.INTERNAL].counts[:, 1]  # class 1: the lesion
        tp, fp, fn = counts[:, 0].sum(), counts[:, 1].sum(), counts[:, 2].sum()
        assert doc[net][paradigm]["internal"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_image_dice_follows_monai_ignore_empty_false():
    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.random((6, 8, 8)) < 0.3)
    truth = torch.from_numpy(rng.random((6, 8, 8)) < 0.3)
    truth[0] = False
    pred[0] = False  # both empty -> 1
    truth[1] = False  # false alarm on a normal image -> 0
    p, t = pred.numpy(), truth.numpy()
    counts = np.stack(
        [(p & t).sum((1, 2)), (p & ~t).sum((1, 2)), (~p & t).sum((1, 2)), (~p & ~t).sum((1, 2))],
        axis=1,
    )[:, None, :]
    scores = SegScores(sites=("s",) * 6, case_ids=tuple(map(str, range(6))), counts=counts)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    expected = metric(pred[:, None].float(), truth[:, None].float()).squeeze(1).numpy()
    np.testing.assert_allclose(scores.image_dice(), expected, atol=1e-6)
    assert scores.image_dice()[0] == 1.0 and scores.image_dice()[1] == 0.0


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    fg = rng.integers(0, 50, size=(40, 4))
    counts = np.stack([fg[:, [3, 2, 1, 0]], fg], axis=1)  # binary: background = roles swapped
    data = SegScores(sites=("s",) * 40, case_ids=tuple(map(str, range(40))), counts=counts)
    a = split_metrics(data, resamples=300, level=0.95, seed=3)
    b = split_metrics(data, resamples=300, level=0.95, seed=3)
    assert a == b
    fg = counts[:, 1].sum(0)
    assert a["dice"] == pytest.approx(2 * fg[0] / (2 * fg[0] + fg[1] + fg[2]))
    assert a["dice_ci"][0] < a["dice"] < a["dice_ci"][1]
    narrow = split_metrics(data, resamples=300, level=0.5, seed=3)
    assert narrow["dice_ci"][1] - narrow["dice_ci"][0] < a["dice_ci"][1] - a["dice_ci"][0]


def test_wilcoxon_comparisons_match_scipy(study):
    result, _ = study
    doc = json.loads((result.out_dir / "results.json").read_text())
    rows = list(csv.DictReader((result.out_dir / "segmentation.csv").open()))

    def dice(paradigm, split):
        return np.array(
            [float(r["dice"]) for r in rows if r["paradigm"] == paradigm and r["split"] == split]
        )

    comps = doc["comparisons"]
    assert {(c["split"], c["b"]) for c in comps} >= {
        ("internal", "centralized"),
        ("external", "centralized"),
        ("internal", "local:site1"),
    }
    for c in comps:
        assert c["test"] == "wilcoxon" and c["a"] == "federated"
        a, b = dice("federated", c["split"]), dice(c["b"], c["split"])
        assert c["difference"] == pytest.approx(a.mean() - b.mean())
        if np.allclose(a, b):
            assert c["p_value"] is None
        else:
            assert c["p_value"] == pytest.approx(wilcoxon(a, b).pvalue)


def test_overlays_and_report(study):
    result, fed = study
    doc = json.loads((result.out_dir / "results.json").read_text())
    rel = doc["meta"]["overlays"]["UNet"]
    png = (result.out_dir / rel).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.report_html is not None and result.report_html.is_file()
    html = result.report_html.read_text()
    assert "Dice" in html and "data:image/png;base64" in html


def test_history_rows_carry_segmentation_metrics(study):
    result, _ = study
    path = (
        result.out_dir
        / json.loads((result.out_dir / "results.json").read_text())["meta"]["histories"]["UNet"][
            "federated"
        ]
    )
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 3
    assert set(rows[-1]["val"]) == {"dice", "jaccard", "pixel_acc", "mean_image_dice"}
    assert rows[-1]["val_auc"] is None and set(rows[-1]["external"]) == set(rows[-1]["val"])


def test_rerun_skips_finished_runs(study, monkeypatch):
    result, fed = study
    import medfed.study.runs as runs

    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "run_engine", boom)
    again = run_study(
        build_study_config(RAW),
        out_dir=result.out_dir,
        federation=fed,
        progress=False,
        report=False,
    )
    assert again.results["UNet"] == result.results["UNet"]


def test_classification_network_is_refused_for_segmentation():
    raw = RAW | {"networks": [{"label": "CNN", "model": {"name": "medfed:smallcnn"}}]}
    with pytest.raises(ValueError, match="CNN.*classification network.*segmentation"):
        build_study_config(raw)


def test_data_without_masks_is_refused_naming_the_site(tmp_path):
    with pytest.raises(StudyError, match="site 'site0' has none"):
        run_study(
            build_study_config(RAW), out_dir=tmp_path, federation=make_federation(2), progress=False
        )
