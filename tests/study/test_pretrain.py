"""A study's warm start on public data: one pretraining per architecture, every network (with and
without DP) starting from exactly those weights, reuse on rerun, the report's sentence, and the
configs that would pretrain on private data refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from medfed.config import load_config
from medfed.engine import build_model
from medfed.study import build_study_config, run_study
from medfed.study.pretrain import pretrain_dir

pytestmark = pytest.mark.slow


def raw_config(cache: str) -> dict:
    data = {
        "source": "synthetic_histology",
        "cache_dir": cache,
        "histology": {"image_size": 32, "tiles_scale": 0.01, "num_sites": 3},
    }
    public = {
        **data,
        "histology": {**data["histology"], "cohort": "public", "external": False},
    }
    return {
        "name": "tiny-pretrain",
        "task": "segmentation",
        "device": "cpu",
        "data": data,
        "networks": [
            {"label": "U-Net", "model": {"name": "medfed:tinyunet"}},
            {
                "label": "U-Net + DP",
                "model": {"name": "medfed:tinyunet"},
                "privacy": {"dp": {"mode": "dpsgd", "noise_multiplier": 0.5, "clip": 1.0}},
            },
        ],
        "paradigms": ["federated"],
        "budget": {"pooled_epochs": 2},
        "federation": {"rounds": 2, "min_clients": 2},
        "train": {"batch_size": 4, "optimizer": "sgd", "lr": 0.05},
        "stats": {"bootstrap_resamples": 50, "overlays_per_site": 1},
        "pretrain": {"data": public, "epochs": 2, "train": {"lr": 0.1}},
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    raw = raw_config(str(root / "cache"))
    result = run_study(build_study_config(raw), out_dir=root / "study", progress=False)
    return result, raw


def test_one_pretraining_per_architecture_on_the_public_cohort(study):
    result, _ = study
    out = result.out_dir
    assert [p.name for p in (out / "pretrain").iterdir()] == ["medfed-tinyunet"]
    run_dir = pretrain_dir(out, "medfed:tinyunet")
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.paradigm == "centralized" and cfg.data.histology.cohort == "public"
    assert cfg.federation.rounds == 2 and cfg.train.lr == 0.1 and cfg.train.epochs == 1.0
    assert cfg.privacy.dp is None  # public data: nothing to protect, no budget spent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["site_val"]) == ["public-1", "public-2"]


def test_every_network_starts_from_the_pretrained_weights(study):
    result, _ = study
    out = result.out_dir
    weights = load_file(str(pretrain_dir(out, "medfed:tinyunet").resolve() / "final.safetensors"))
    for slug in ("u-net", "u-net-dp"):
        run_dir = out / "runs" / slug / "federated"
        cfg = load_config(run_dir / "config.yaml")
        assert cfg.model.pretrained_path == pretrain_dir(out, "medfed:tinyunet").resolve() / (
            "final.safetensors"
        )
        from medfed.engine import load_federation

        fed, _ = load_federation(cfg.data)
        start = build_model(cfg, fed).state_dict()
        assert set(weights) <= set(start)
        assert all(torch.equal(start[k], weights[k]) for k in weights), slug


def test_results_and_report_say_where_the_networks_started(study):
    result, _ = study
    budget = result.results["meta"]["budget"]["pretrain"]
    assert budget["source"] == "synthetic_histology (public cohort)" and budget["epochs"] == 2
    entry = budget["models"]["medfed:tinyunet"]
    summary = json.loads((result.out_dir / entry["run"] / "summary.json").read_text())
    assert entry["val"] == summary["val"]
    # 15 tiles per public archive at this scale, 80 % of them train: 12 + 12
    assert entry["train_images"] == 24
    html = result.report_html.read_text()
    assert "pretrained centrally on public data" in html
    assert f"its validation Dice {summary['val']['dice']:.3f}" in html


def test_rerun_reuses_the_pretraining(study, monkeypatch):
    result, raw = study
    import medfed.study.runs as runs

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "run_engine", boom)
    again = run_study(build_study_config(raw), out_dir=result.out_dir, progress=False, report=False)
    assert again.results["U-Net"] == result.results["U-Net"]


def test_configs_that_would_pretrain_on_private_data_are_refused(tmp_path):
    raw = raw_config(str(tmp_path))
    same = {**raw, "pretrain": {**raw["pretrain"], "data": raw["data"]}}
    with pytest.raises(ValueError, match="pretrain.data is the study's own data"):
        build_study_config(same)
    other_seed = {**raw["data"], "histology": {**raw["data"]["histology"], "seed": 7}}
    with pytest.raises(ValueError, match="still the private distribution"):
        build_study_config({**raw, "pretrain": {**raw["pretrain"], "data": other_seed}})
    both = {
        **raw,
        "networks": [
            {"label": "U-Net", "model": {"name": "medfed:tinyunet", "pretrained_path": "w.st"}}
        ],
    }
    with pytest.raises(ValueError, match=r"\['U-Net'\] set model.pretrained_path"):
        build_study_config(both)
    with pytest.raises(ValueError, match="derived from pretrain.epochs"):
        build_study_config({**raw, "pretrain": {**raw["pretrain"], "train": {"epochs": 3}}})
    with pytest.raises(ValueError, match="epochs"):
        build_study_config({**raw, "pretrain": {**raw["pretrain"], "epochs": 0}})


def test_public_data_the_networks_cannot_load_is_refused_before_training(tmp_path, monkeypatch):
    import medfed.study.runs as runs
    from medfed.study.pretrain import PretrainError
    from tests.conftest import make_seg_federation

    def boom(*args, **kwargs):
        raise AssertionError("trained although the weights could not be used")

    monkeypatch.setattr(runs, "run_engine", boom)
    grey = make_seg_federation(3, n=12, size=32)  # 1 channel; the public H&E tiles have 3
    cfg = build_study_config(raw_config(str(tmp_path / "cache")))
    with pytest.raises(PretrainError, match="3-channel images, the study's data 1-channel"):
        run_study(cfg, out_dir=tmp_path / "study", federation=grey, progress=False)
