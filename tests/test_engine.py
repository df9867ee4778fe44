"""End-to-end engine behaviour on a tiny in-memory federation (seconds, CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from medfed.config import build_config
from medfed.engine import FederationError, run
from medfed.models.factory import create_model
from medfed.progress import Reporter
from medfed.types import params_nbytes

REQUIRED_KEYS = {
    "round",
    "sites",
    "val_auc",
    "val_acc",
    "rejected",
    "bytes_up",
    "bytes_down",
    "seconds",
}


def cfg(*overrides, rounds=3, faults=()):
    base = [
        f"federation.rounds={rounds}",
        "federation.min_clients=2",
        "model.name=medfed:tinycnn",
        "train.batch_size=16",
        "train.lr=0.05",
        "device=cpu",
    ]
    return build_config({"faults": list(faults)}, [*base, *overrides])


def test_fedavg_run_writes_everything_and_learns(tmp_path, tiny_federation):
    res = run(cfg(rounds=4), out_dir=tmp_path, federation=tiny_federation, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= REQUIRED_KEYS
    assert set(rows[0]["sites"]) == {"site0", "site1", "site2"}
    assert rows[0]["sites"]["site1"]["examples"] == len(tiny_federation.site("site1").train)
    assert rows[-1]["val_auc"] > 0.8
    assert (tmp_path / "final.safetensors").exists() and (tmp_path / "config.yaml").exists()
    assert "hash" in (tmp_path / "config.yaml").read_text().splitlines()[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val_auc"] == rows[-1]["val_auc"] and summary["wall_seconds"] > 0
    final = load_file(str(tmp_path / "final.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in res.final_params.items())
    # bytes: each of 3 sites downloads and uploads the whole model once per round
    model_bytes = params_nbytes(res.final_params)
    assert rows[0]["bytes_down"] == 3 * model_bytes and rows[0]["bytes_up"] == 3 * model_bytes


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("nan", "non-finite"),
        ("wrong_shape", "has shape"),
        ("raise", "client raised InjectedFault"),
        ("drop", "dropped out"),
        ("scale", "exceeds"),
    ],
)
def test_faulty_site_is_rejected_and_run_goes_on(tmp_path, tiny_federation, kind, reason):
    c = cfg(rounds=2, faults=[{"site": "site1", "kind": kind, "factor": 1e4}])
    run(c, out_dir=tmp_path, federation=tiny_federation, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    for row in rows:
        assert list(row["rejected"]) == ["site1"]
        assert reason in row["rejected"]["site1"]
        assert set(row["sites"]) == {"site0", "site2"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rejected_rounds"] == {"site1": 2}


def test_fault_for_an_unknown_site_is_an_error(tmp_path, tiny_federation):
    c = cfg(faults=[{"site": "nosuch", "kind": "nan"}])
    with pytest.raises(FederationError, match=r"unknown site\(s\) \['nosuch'\]; sites: site0"):
        run(c, out_dir=tmp_path, federation=tiny_federation, progress=False)


def test_too_few_valid_updates_stops_with_named_sites(tmp_path, tiny_federation):
    c = cfg(
        "federation.min_clients=3",
        rounds=3,
        faults=[{"site": "site2", "kind": "nan", "rounds": [1]}],
    )
    with pytest.raises(FederationError, match=r"round 1: only 2 valid update.*site2: params"):
        run(c, out_dir=tmp_path, federation=tiny_federation, progress=False)
    # round 0 completed and was checkpointed: nothing lost
    assert (tmp_path / "checkpoints" / "round_0000" / "global.safetensors").exists()


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "scaffold", "fedbn"])
def test_resume_after_crash_is_bit_identical(tmp_path, tiny_federation, monkeypatch, strategy):
    """Crash after round 1's checkpoint, resume: same final parameters as an uninterrupted run."""
    c = cfg(
        f"federation.strategy.name={strategy}",
        "model.name=medfed:smallcnn",
        "train.momentum=0",
        rounds=4,
    )
    whole = run(c, out_dir=tmp_path / "whole", federation=tiny_federation, progress=False)

    original = Reporter.round_done

    def crash_after_two(self, rec):
        original(self, rec)
        if rec.round == 1:
            raise _Crash()

    monkeypatch.setattr(Reporter, "round_done", crash_after_two)
    with pytest.raises(_Crash):
        run(c, out_dir=tmp_path / "cut", federation=tiny_federation, progress=False)
    monkeypatch.setattr(Reporter, "round_done", original)
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    resumed = run(
        c, out_dir=tmp_path / "cut", resume=True, federation=tiny_federation, progress=False
    )
    for k, v in whole.final_params.items():
        assert torch.equal(v, resumed.final_params[k]), k
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3]


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_federation):
    run(cfg(rounds=1), out_dir=tmp_path, federation=tiny_federation, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg(rounds=1), out_dir=tmp_path, federation=tiny_federation, progress=False)


def test_resume_refuses_a_different_config(tmp_path, tiny_federation):
    run(cfg(rounds=1), out_dir=tmp_path, federation=tiny_federation, progress=False)
    # The message names the setting that changed, read from the run's own config.yaml.
    with pytest.raises(FederationError, match=r"train\.lr: 0\.05 -> 0\.01.*refusing to mix runs"):
        run(
            cfg("train.lr=0.01", rounds=2),
            out_dir=tmp_path,
            resume=True,
            federation=tiny_federation,
            progress=False,
        )


def test_centralized_baseline_trains_on_pooled_data(tmp_path, tiny_federation):
    res = run(
        cfg("paradigm=centralized", rounds=2),
        out_dir=tmp_path,
        federation=tiny_federation,
        progress=False,
    )
    rows = list(res.history)
    assert list(rows[0]["sites"]) == ["pooled"]
    assert rows[0]["sites"]["pooled"]["examples"] == len(tiny_federation.pooled_train())
    assert set(rows[0]["site_val"]) == {"site0", "site1", "site2"}


def test_local_baseline_one_model_per_site(tmp_path, tiny_federation):
    res = run(
        cfg("paradigm=local", rounds=2),
        out_dir=tmp_path,
        federation=tiny_federation,
        progress=False,
    )
    assert set(res.summary["sites"]) == {"site0", "site1", "site2"}
    for site in ("site0", "site1", "site2"):
        rows = [
            json.loads(x)
            for x in (tmp_path / "local" / site / "history.jsonl").read_text().splitlines()
        ]
        assert list(rows[0]["sites"]) == [site]
    assert json.loads((tmp_path / "summary.json").read_text())["paradigm"] == "local"


def test_fedavg_of_one_site_equals_plain_local_training(tmp_path, tiny_federation):
    """A federation of one site must be exactly local training: the engine adds no arithmetic."""
    from medfed.algorithms.base import read_params
    from medfed.client.train import train_local
    from medfed.data.site import Federation
    from medfed.seeding import derive_seed, torch_generator

    site = tiny_federation.site("site0")
    c = cfg("federation.min_clients=1", rounds=2)
    res = run(c, out_dir=tmp_path, federation=Federation((site,)), progress=False)
    torch.manual_seed(derive_seed(0, "init"))
    model = create_model("medfed:tinycnn", num_classes=2, in_chans=1, image_size=16)
    for r in range(2):
        torch.manual_seed(derive_seed(0, "torch", r, "site0"))
        train_local(
            model,
            site.train,
            c.train,
            generator=torch_generator(0, "train", r, "site0"),
            device=torch.device("cpu"),
        )
    ref = read_params(model)
    for k, v in ref.items():
        assert torch.equal(v, res.final_params[k]), k
