"""The whole FedDP path on a tiny federation: a U-Net trained with and without DP-SGD in one
study, ε per run in results.json exactly as the runs recorded it, the cost against the twin, and
the report's Privacy section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medfed.study import StudyResult, build_study_config, run_study
from medfed.study.privacy import SPENT_KEYS
from tests.conftest import make_seg_federation

pytestmark = pytest.mark.slow

SIGMA = 1.0
RAW = {
    "name": "tiny-feddp",
    "task": "segmentation",
    "device": "cpu",
    "networks": [
        {"label": "U-Net", "model": {"name": "medfed:smallunet"}},
        {
            "label": "U-Net + DP",
            "model": {"name": "medfed:smallunet"},
            "privacy": {"dp": {"mode": "dpsgd", "noise_multiplier": 1.0, "clip": 1.0}},
        },
    ],
    "paradigms": ["federated", "local"],
    "budget": {"pooled_epochs": 1},
    "federation": {"rounds": 2, "min_clients": 2},
    "train": {"batch_size": 8, "optimizer": "adam", "lr": 0.01},
    "stats": {"bootstrap_resamples": 50, "overlays_per_site": 1},
}
KEYS = ["federated", "local:site0", "local:site1"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyResult:
    out = tmp_path_factory.mktemp("feddp")
    fed = make_seg_federation(2, n=16, size=16)
    return run_study(build_study_config(RAW), out_dir=out, federation=fed, progress=False)


def _summary(out: Path, slug: str, key: str) -> dict[str, Any]:
    run = out / "runs" / slug / key if ":" not in key else out / "runs" / slug / "local" / "local"
    path = run / key.split(":")[1] / "summary.json" if ":" in key else run / "summary.json"
    return json.loads(path.read_text())


def test_meta_privacy_is_what_each_run_recorded(study: StudyResult) -> None:
    doc = json.loads((study.out_dir / "results.json").read_text())
    assert doc == study.results
    plain, private = doc["meta"]["privacy"]["U-Net"], doc["meta"]["privacy"]["U-Net + DP"]
    assert plain == {"dp": None, "spent": dict.fromkeys(KEYS)}
    assert private["dp"]["mode"] == "dpsgd" and private["dp"]["noise_multiplier"] == SIGMA
    assert list(private["spent"]) == KEYS and "stopped" not in private
    for key in KEYS:
        recorded = _summary(study.out_dir, "u-net-dp", key)["privacy"]
        assert private["spent"][key] == {k: recorded[k] for k in SPENT_KEYS}
        assert private["spent"][key]["max_epsilon"] > 0
        assert set(private["spent"][key]["noise_multiplier"].values()) == {SIGMA}
    sites = set(private["spent"]["federated"]["epsilon"])
    assert sites == {"site0", "site1"}
    assert set(private["spent"]["local:site1"]["epsilon"]) == {"site1"}


def test_privacy_cost_compares_with_the_twin_on_the_same_images(study: StudyResult) -> None:
    doc = study.results
    cost = doc["privacy"]
    assert list(cost) == ["U-Net + DP"]
    block = cost["U-Net + DP"]
    assert block["twin"] == "U-Net" and list(block["paradigms"]) == KEYS
    for key, pc in block["paradigms"].items():
        assert pc["epsilon"] == doc["meta"]["privacy"]["U-Net + DP"]["spent"][key]["max_epsilon"]
        assert pc["delta"] == 1e-5 and pc["mode"] == "dpsgd"
        assert set(pc["splits"]) == set(doc["U-Net + DP"][key])
        for split, by_metric in pc["splits"].items():
            for metric in ("dice", "jaccard", "pixel_acc"):
                d = by_metric[metric]
                assert d["with_dp"] == doc["U-Net + DP"][key][split][metric]
                assert d["without_dp"] == doc["U-Net"][key][split][metric]
                assert d["drop"] == pytest.approx(d["without_dp"] - d["with_dp"])


def test_report_has_the_privacy_section(study: StudyResult) -> None:
    assert study.report_html is not None and study.report_md is not None
    html, md = study.report_html.read_text(), study.report_md.read_text()
    assert '<section id="privacy"><h2>Privacy</h2>' in html and '<a href="#privacy">' in html
    assert 'id="table-privacy"' in html and 'id="table-privacy-cost-1"' in html
    assert 'alt="Privacy spent per round by U-Net + DP"' in html
    assert "## Privacy" in md and "**Table 8. What DP cost U-Net + DP" in md
    eps = study.results["privacy"]["U-Net + DP"]["paradigms"]["federated"]["epsilon"]
    assert f"Training U-Net federated with sample-level DP-SGD (ε = {eps:.2f} at δ = 1e-5)" in md
    assert f"Federated (ε = {eps:.2f})" in html
    # both networks get example overlays although the study trained no centralized model
    for rel in study.results["meta"]["overlays"].values():
        assert (study.out_dir / rel).is_file()
