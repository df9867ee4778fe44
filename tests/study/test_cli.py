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
