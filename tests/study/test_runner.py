"""A whole study on a tiny federation: files, numbers that agree with independent tools, resume."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfed.study import StudyError, build_study_config, run_study
from medfed.study.stats import Split, read_predictions, study_results
from tests.conftest import make_federation

pytestmark = pytest.mark.slow

RAW = {
    "name": "tiny-study",
    "device": "cpu",
    "networks": [
        {"label": "Tiny", "model": {"name": "medfed:tinycnn"}},
        {"label": "Small", "model": {"name": "medfed:smallcnn"}, "train": {"lr": 0.02}},
    ],
    "budget": {"pooled_epochs": 2},
    "federation": {"rounds": 2, "min_clients": 2},
    "train": {"batch_size": 16, "lr": 0.05},
    "stats": {"bootstrap_resamples": 60},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    fed = make_federation(3, n=60, size=16)
    result = run_study(build_study_config(RAW), out_dir=out, federation=fed, progress=False)
    return result, fed


def test_results_json_has_every_network_paradigm_and_split(study):
    result, fed = study
    doc = json.loads((result.out_dir / "results.json").read_text())
    assert doc["config_hash"] and doc["meta"]["networks"] == ["Tiny", "Small"]
    paradigms = ["centralized", "federated", "local:site0", "local:site1", "local:site2"]
    assert doc["meta"]["paradigms"] == paradigms
    for net in ("Tiny", "Small"):
        assert list(doc[net]) == paradigms
        for p in paradigms:
            splits = doc[net][p]
            assert set(splits) == {"internal", "external", "site:site0", "site:site1", "site:site2"}
            m = splits["internal"]
            for key in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
                assert f"{key}_ci" in m
            assert m["n"] == sum(len(s.val) for s in fed.sites)
            lo, hi = m["auc_ci"]
            assert lo <= m["auc"] <= hi
            # the threshold is chosen on internal validation and applied unchanged elsewhere
            assert splits["external"]["threshold"] == m["threshold"]
            assert doc["timing"][net][p]["train_images"] > 0
    # equal budgets: every paradigm saw pooled_epochs x N training images (up to dropped
    # trailing batches of one)
    n_train = sum(len(s.train) for s in fed.sites)
    for net in ("Tiny", "Small"):
        t = doc["timing"][net]
        local_total = sum(t[f"local:site{i}"]["train_images"] for i in range(3))
        for seen in (t["centralized"]["train_images"], t["federated"]["train_images"], local_total):
            assert abs(seen - 2 * n_train) <= 2 * 2 * 3
    assert doc["meta"]["communication"]["Tiny"]["rounds"] == 2


def test_predictions_csv_reproduces_every_statistic(study):
    result, fed = study
    doc = json.loads((result.out_dir / "results.json").read_text())
    preds = read_predictions(result.out_dir / "predictions.csv")
    # independent check of the AUCs with scikit-learn, straight from the CSV
    with (result.out_dir / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"network", "paradigm", "split", "site", "case_id", "label", "score"}
    for net, p, split in [("Tiny", "federated", "internal"), ("Small", "local:site1", "external")]:
        sel = [r for r in rows if (r["network"], r["paradigm"], r["split"]) == (net, p, split)]
        y = np.array([int(r["label"]) for r in sel])
        s = np.array([float(r["score"]) for r in sel])
        assert doc[net][p][split]["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # per-site results are the internal rows of that site
    sel = [
        r
        for r in rows
        if (r["network"], r["paradigm"], r["split"], r["site"])
        == ("Tiny", "centralized", "internal", "site2")
    ]
    y = np.array([int(r["label"]) for r in sel])
    s = np.array([float(r["score"]) for r in sel])
    assert doc["Tiny"]["centralized"]["site:site2"]["auc"] == pytest.approx(roc_auc_score(y, s))
    # and the whole results block, recomputed from the file, is identical
    again, comps = study_results(
        preds, networks=["Tiny", "Small"], site_names=fed.names, resamples=60, level=0.95, seed=0
    )
    assert json.loads(json.dumps(again)) == {k: doc[k] for k in ("Tiny", "Small")}
    assert json.loads(json.dumps(comps)) == doc["comparisons"]
    assert len(preds[("Tiny", "federated")][Split.EXTERNAL].labels) == len(fed.external.val)


def test_comparisons_pair_federated_with_every_other_model(study):
    result, _ = study
    comps = result.results["comparisons"]
    pairs = {(c["network"], c["split"], c["b"]) for c in comps}
    for net in ("Tiny", "Small"):
        for split in ("internal", "external"):
            for b in ("centralized", "local:site0", "local:site1", "local:site2"):
                assert (net, split, b) in pairs
    for c in comps:
        assert c["a"] == "federated" and 0.0 <= c["p_value"] <= 1.0
        assert c["difference"] == pytest.approx(c["auc_a"] - c["auc_b"])


def test_report_files_are_written(study):
    result, _ = study
    html = result.report_html.read_text()
    assert "Tiny" in html and "Small" in html and "<table" in html
    assert "| " in result.report_md.read_text()


def test_rerun_skips_finished_runs_and_a_different_config_is_refused(study, monkeypatch):
    result, fed = study
    import medfed.study.runs as runs

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "run_engine", boom)
    again = run_study(
        build_study_config(RAW),
        out_dir=result.out_dir,
        federation=fed,
        progress=False,
        report=False,
    )
    assert again.results["Tiny"] == result.results["Tiny"]
    other = build_study_config({**RAW, "budget": {"pooled_epochs": 4}})
    # The refusal names what changed (the budget), not just two hashes.
    with pytest.raises(StudyError, match=r"holds a study.*budget\.pooled_epochs: 2\.0 -> 4\.0"):
        run_study(other, out_dir=result.out_dir, federation=fed, progress=False)


def test_interrupted_study_resumes_from_the_last_completed_round(tmp_path, monkeypatch):
    """Killed after round 2 of 3, the rerun continues that run and ends bit-identical."""
    from safetensors.torch import load_file

    from medfed.progress import Reporter

    fed = make_federation(2, n=40, size=16, external=False)
    raw = {
        **RAW,
        "networks": RAW["networks"][:1],
        "paradigms": ["federated"],
        "federation": {"rounds": 3, "min_clients": 2},
        "budget": {"pooled_epochs": 3},
    }
    cfg = build_study_config(raw)
    run_study(cfg, out_dir=tmp_path / "clean", federation=fed, progress=False, report=False)

    real = Reporter.round_done
    done = {"n": 0}

    def killed_after_two_rounds(self, rec):
        real(self, rec)
        done["n"] += 1
        if done["n"] == 2:  # round 2's checkpoint is on disk; the process dies here
            raise KeyboardInterrupt

    monkeypatch.setattr(Reporter, "round_done", killed_after_two_rounds)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, out_dir=tmp_path / "crash", federation=fed, progress=False, report=False)
    monkeypatch.setattr(Reporter, "round_done", real)
    trained_rounds = []
    import medfed.study.runs as runs

    real_engine = runs.run_engine

    def spy(run_cfg, **kwargs):
        trained_rounds.append(kwargs["resume"])
        return real_engine(run_cfg, **kwargs)

    monkeypatch.setattr(runs, "run_engine", spy)
    resumed = run_study(
        cfg, out_dir=tmp_path / "crash", federation=fed, progress=False, report=False
    )
    assert trained_rounds == [True]
    rows = (tmp_path / "crash/runs/tiny/federated/history.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [0, 1, 2]
    a = load_file(str(tmp_path / "clean/runs/tiny/federated/final.safetensors"))
    b = load_file(str(tmp_path / "crash/runs/tiny/federated/final.safetensors"))
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert (
        resumed.results["Tiny"] == json.loads((tmp_path / "clean/results.json").read_text())["Tiny"]
    )
