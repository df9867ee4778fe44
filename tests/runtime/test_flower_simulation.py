"""One algorithm code, two runtimes: Flower's simulation reproduces the in-process run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")

from flwr.simulation import run_simulation  # noqa: E402

from medfed.config import build_config  # noqa: E402
from medfed.engine import load_federation, run  # noqa: E402
from medfed.runtime.flower import client  # noqa: E402
from medfed.runtime.flower.server import server_app  # noqa: E402

pytestmark = pytest.mark.slow


def _config(tmp_path, strategy: str = "fedavg", *extra: str, faults=()):
    return build_config(
        {"faults": list(faults)},
        [
            "data.ultrasound.scale=0.03",
            "data.ultrasound.num_sites=3",
            "data.ultrasound.image_size=32",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.name=medfed:tinycnn",
            "train.batch_size=16",
            "federation.rounds=2",
            "federation.min_clients=3",
            f"federation.strategy.name={strategy}",
            "device=cpu",
            *extra,
        ],
    )


def _both(tmp_path, config):
    """The in-process run and the same run in Flower's simulation."""
    fed, _ = load_federation(config.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Flower's simulation runs each client with one thread
    try:
        ref = run(config, out_dir=tmp_path / "inproc", federation=fed, progress=False)
    finally:
        torch.set_num_threads(threads)
    app = server_app(config, out_dir=tmp_path / "flower", num_sites=3, timeout=300, progress=False)
    run_simulation(
        server_app=app,
        client_app=client.app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return fed, ref


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_simulation_matches_the_in_process_runtime(tmp_path, strategy):
    config = _config(tmp_path, strategy)
    fed, ref = _both(tmp_path, config)
    ours = load_file(str(tmp_path / "flower" / "final.safetensors"))
    assert ours.keys() == ref.final_params.keys()
    for k, v in ref.final_params.items():
        diff = (ours[k].double() - v.double()).abs().max().item() if v.numel() else 0.0
        assert diff <= 1e-6, (k, diff)
    rows = [json.loads(x) for x in (tmp_path / "flower" / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert set(rows[-1]["site_val"]) == {s.name for s in fed.sites}
    ref_rows = list(ref.history)
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["bytes_up"] == b["bytes_up"]  # the same tensors cross the wire
        # per-site AUC computed at the site equals the simulator's
        for site, m in b["site_val"].items():
            assert a["site_val"][site]["auc"] == pytest.approx(m["auc"], abs=1e-6)
        # the pooled AUC from binned site histograms: exact up to the 1e-4 score quantisation
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=2e-3)


def test_failing_and_poisoned_sites_are_rejected_the_same_way(tmp_path):
    """A site that errors (as a dropout would) or sends NaN loses its round, on both runtimes."""
    faults = [
        {"site": "site2", "kind": "raise", "rounds": [0]},
        {"site": "site3", "kind": "nan", "rounds": [1]},
    ]
    config = _config(tmp_path, "fedavg", "federation.min_clients=2", faults=faults)
    _, ref = _both(tmp_path, config)
    rows = [json.loads(x) for x in (tmp_path / "flower" / "history.jsonl").read_text().splitlines()]
    assert (
        list(rows[0]["rejected"]) == ["site2"] and "InjectedFault" in rows[0]["rejected"]["site2"]
    )
    assert list(rows[1]["rejected"]) == ["site3"] and "non-finite" in rows[1]["rejected"]["site3"]
    assert [sorted(r["sites"]) for r in rows] == [sorted(r["sites"]) for r in ref.history]
    ours = load_file(str(tmp_path / "flower" / "final.safetensors"))
    for k, v in ref.final_params.items():
        assert (ours[k].double() - v.double()).abs().max().item() <= 1e-6, k


def test_segmentation_matches_and_pools_counts_not_masks(tmp_path):
    """Federated segmentation over Flower: the same weights, and pooled Dice from the sites'
    summed confusion counts equal to the simulator's Dice over every validation pixel."""
    config = _config(tmp_path, "fedavg", "task=segmentation", "model.name=medfed:smallunet")
    _, ref = _both(tmp_path, config)
    ours = load_file(str(tmp_path / "flower" / "final.safetensors"))
    for k, v in ref.final_params.items():
        assert (ours[k].double() - v.double()).abs().max().item() <= 1e-6, k
    rows = [json.loads(x) for x in (tmp_path / "flower" / "history.jsonl").read_text().splitlines()]
    for a, b in zip(rows, ref.history, strict=True):
        assert a["val_auc"] is None
        for key in ("dice", "jaccard", "pixel_acc", "mean_image_dice"):
            assert a["val"][key] == pytest.approx(b["val"][key], abs=1e-9), key
        for site, m in b["site_val"].items():
            assert a["site_val"][site]["dice"] == pytest.approx(m["dice"], abs=1e-9)


@pytest.mark.parametrize(
    "dp",
    [
        ["privacy.dp.mode=dpsgd", "privacy.dp.noise_multiplier=1.0"],
        ["privacy.dp.mode=central", "privacy.dp.noise_multiplier=0.5", "privacy.dp.clip=0.5"],
    ],
    ids=["dpsgd", "central"],
)
def test_dp_runs_the_same_on_flower_with_the_same_privacy_spend(tmp_path, dp):
    """The DP wrapper is an algorithm like any other: per-example noise at the SuperNodes (their
    accountant history kept in the node's state) or central noise at the ServerApp reproduce the
    simulator's model, and the server records the same ε per site."""
    config = _config(tmp_path, "fedavg", *dp)
    _, ref = _both(tmp_path, config)
    ours = load_file(str(tmp_path / "flower" / "final.safetensors"))
    for k, v in ref.final_params.items():
        assert (ours[k].double() - v.double()).abs().max().item() <= 1e-6, k
    rows = [json.loads(x) for x in (tmp_path / "flower" / "history.jsonl").read_text().splitlines()]
    for a, b in zip(rows, ref.history, strict=True):
        assert a["privacy"]["epsilon"] == pytest.approx(b["privacy"]["epsilon"], rel=1e-12)
        assert a["privacy"]["max_epsilon"] > 0
