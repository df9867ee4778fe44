"""``medfed study`` as a user meets it: a YAML file, --set overrides, exit codes."""

import json
from pathlib import Path

import yaml

from medfed.cli import main

STUDY = {
    "name": "cli-study",
    "device": "cpu",
    "data": {"ultrasound": {"scale": 0.03, "num_sites": 2, "image_size": 32}},
    "networks": [{"label": "Tiny", "model": {"name": "medfed:tinycnn"}}],
    "budget": {"pooled_epochs": 1},
    "federation": {"rounds": 1},
    "train": {"batch_size": 16},
    "stats": {"bootstrap_resamples": 50},
}


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return path


def test_medfed_study_writes_results_predictions_and_report(tmp_path, capsys):
    cfg = _write(tmp_path)
    out = tmp_path / "out"
    code = main(
        ["study", str(cfg), "--quiet", "--out", str(out), "--set", f"data.cache_dir={tmp_path}/c"]
    )
    assert code == 0
    for name in ("results.json", "predictions.csv", "report.html", "report.md", "study.yaml"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["sites"] == ["site1", "site2"] and doc["meta"]["external_site"] == "site7"
    printed = capsys.readouterr().out
    assert "Tiny" in printed and "federated" in printed and "AUC" in printed


def test_study_config_typo_is_exit_2_and_names_the_key(tmp_path, capsys):
    cfg = _write(tmp_path)
    code = main(["study", str(cfg), "--set", "budget.pooled_epoch=3", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "pooled_epoch" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written for an invalid config


def test_segmentation_study_on_the_histology_federation(tmp_path, capsys):
    """The seg quick start's shape, shrunk: H&E tiles, a U-Net, Dice in the output and report."""
    study = {
        "name": "cli-seg",
        "task": "segmentation",
        "device": "cpu",
        "data": {
            "source": "synthetic_histology",
            "histology": {"image_size": 32, "tiles_scale": 0.02, "num_sites": 2},
        },
        "networks": [{"label": "UNet", "model": {"name": "medfed:smallunet"}}],
        "paradigms": ["centralized", "federated"],
        "budget": {"pooled_epochs": 2},
        "federation": {"rounds": 2},
        "train": {"batch_size": 8, "optimizer": "adam", "lr": 0.003},
        "stats": {"bootstrap_resamples": 50},
    }
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    code = main(
        ["study", str(cfg), "--quiet", "--out", str(out), "--set", f"data.cache_dir={tmp_path}/c"]
    )
    assert code == 0
    for name in ("results.json", "segmentation.csv", "report.html", "report.md"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["task"] == "segmentation" and doc["meta"]["sites"] == ["site-A", "site-B"]
    assert (out / doc["meta"]["overlays"]["UNet"]).is_file()
    printed = capsys.readouterr().out
    assert "UNet" in printed and "Dice" in printed and "AUC" not in printed
