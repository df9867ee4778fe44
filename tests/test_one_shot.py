"""paradigm: one_shot (FedISCA): one upload per site, distillation on the server, end to end."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_average_start_is_the_example_weighted_mean_of_the_teachers(tmp_path):
    """student_init 'average': with a vanishing distillation step the student's weights stay at
    the teachers' example-weighted mean, computed here from the uploaded files by hand."""
    from medfed.checkpoint import load_params

    fed = make_federation(3, n=24)
    res = run(
        _cfg("one_shot.fedisca.student_init=average", "one_shot.fedisca.distill_lr=1e-12"),
        out_dir=tmp_path,
        federation=fed,
        progress=False,
    )
    teachers = [load_params(tmp_path / "sites" / s / "final.safetensors") for s in fed.names]
    sizes = [len(site.train) for site in fed.sites]
    assert len(set(sizes)) > 1  # unequal sites, so the weighting is visible
    weights = [name for name, _ in _trainable(tmp_path, fed)]
    for key in weights:  # BN running statistics move with the synthetic batches; weights do not
        expected = sum(t[key].double() * n for t, n in zip(teachers, sizes, strict=True)) / sum(
            sizes
        )
        torch.testing.assert_close(res.final_params[key].double(), expected, atol=1e-6, rtol=0)
    plain = run(_cfg(), out_dir=tmp_path / "scratch", federation=fed, progress=False)
    key = weights[0]
    assert not torch.allclose(plain.final_params[key], res.final_params[key], atol=1e-3)


def _trainable(run_dir, fed):
    """(name, parameter) of the run's network: trainable tensors only, no buffers."""
    from medfed.build import build_model
    from medfed.config import load_config

    return list(build_model(load_config(run_dir / "config.yaml"), fed).named_parameters())


def test_average_start_refuses_heterogeneous_teachers(tmp_path):
    with pytest.raises(FederationError, match="student_init 'average'.*site1"):
        run(
            _cfg(
                "one_shot.fedisca.student_init=average",
                "one_shot.teacher_models={site1: medfed:tinycnn}",
            ),
            out_dir=tmp_path,
            federation=make_federation(2, n=16),
            progress=False,
        )
    assert not (tmp_path / "sites").exists()  # refused before any teacher trained
