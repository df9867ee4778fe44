"""paradigm: one_shot (FedISCA): one upload per site, distillation on the server, end to end."""

from __future__ import annotations

import json

import pytest

from medfed.config import build_config
from medfed.engine import FederationError, run
from medfed.types import params_nbytes

from .conftest import make_federation, make_seg_federation

TINY = {
    "synthesis_iterations": 6,
    "batch_size": 8,
    "rounds": 2,
    "snapshot_every": 2,
    "distill_lr": 0.01,
}


def _cfg(*sets: str, task: str = "classification", model: str = "medfed:smallcnn"):
    return build_config(
        {
            "device": "cpu",
            "task": task,
            "paradigm": "one_shot",
            "model": {"name": model},
            "federation": {"rounds": 2},
            "train": {"batch_size": 16},
            "one_shot": {"fedisca": TINY},
        },
        list(sets),
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_transfer_per_site_and_a_distilled_global_model(tmp_path):
    fed = make_federation(3, n=32)
    res = run(
        _cfg("one_shot.teacher_models={site1: medfed:tinycnn}"),
        out_dir=tmp_path,
        federation=fed,
        progress=False,
    )
    rows = list(res.history)
    assert len(rows) == 1
    info = rows[0]["extra"]["one_shot"]
    assert info["transfers_per_site"] == 1
    assert info["teachers"] == {
        "site0": "medfed:smallcnn",
        "site1": "medfed:tinycnn",
        "site2": "medfed:smallcnn",
    }
    assert len(info["validation"]) == TINY["rounds"] and 1 <= info["best_epoch"] <= TINY["rounds"]
    # Uploads: each site's final weights exactly once; nothing sent down.
    sizes = []
    for site in fed.names:
        summary = json.loads((tmp_path / "sites" / site / "summary.json").read_text())
        assert summary["rounds"] == 2  # the teacher trained like a local-only run
        sizes.append(summary["bytes_up"] // 2)  # a local run "uploads" every round to itself
    assert rows[0]["bytes_up"] == sum(sizes) and rows[0]["bytes_down"] == 0
    assert (tmp_path / "one_shot_synthesis.png").stat().st_size > 0
    assert (tmp_path / "final.safetensors").exists()
    assert 0.0 <= res.summary["val"]["auc"] <= 1.0
    assert res.summary["one_shot"]["transfers_per_site"] == 1
    assert params_nbytes(res.final_params) > 0


def test_one_shot_refuses_segmentation_and_privacy(tmp_path):
    with pytest.raises(FederationError, match="classifiers"):
        run(
            _cfg(task="segmentation", model="medfed:smallunet"),
            out_dir=tmp_path / "seg",
            federation=make_seg_federation(2),
            progress=False,
        )
    with pytest.raises(FederationError, match="unknown site"):
        run(
            _cfg("one_shot.teacher_models={nowhere: medfed:tinycnn}"),
            out_dir=tmp_path / "bad",
            federation=make_federation(2, n=16),
            progress=False,
        )
