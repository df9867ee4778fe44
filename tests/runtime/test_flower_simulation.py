"""One algorithm code, two runtimes: Flower's simulation reproduces the in-process run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")

from flwr.simulation import run_simulation  # noqa: E402

from medfed.audit.keys import load_private_key, public_hex  # noqa: E402
from medfed.audit.ledger import EntryKind, SqliteChain  # noqa: E402
from medfed.audit.run import LEDGER_FILE  # noqa: E402
from medfed.audit.summary import round_rows  # noqa: E402
from medfed.audit.verify import verify_run  # noqa: E402
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


def test_failing_and_poisoned_sites_are_rejected_the_same_way(tmp_path, monkeypatch):
    """A site that errors (as a dropout would) or sends NaN loses its round, on both runtimes,
    and both write signed ledgers that verify: over Flower each SuperNode signs its own update
    and keeps a replica that agrees with the coordinator's copy, entry for entry. (One Flower
    simulation serves both checks: each costs Ray's start-up.)"""
    faults = [
        {"site": "site2", "kind": "raise", "rounds": [0]},
        {"site": "site3", "kind": "nan", "rounds": [1]},
    ]
    config = _config(tmp_path, "fedavg", "federation.min_clients=2", faults=faults)
    sites_dir = tmp_path / "sites"  # each SuperNode's own ledger folder (key + replica)
    monkeypatch.setenv("MEDFED_LEDGER_DIR", str(sites_dir))
    _, ref = _both(tmp_path, config)
    _check_ledgers(tmp_path, sites_dir)
    rows = [json.loads(x) for x in (tmp_path / "flower" / "history.jsonl").read_text().splitlines()]
    assert (
        list(rows[0]["rejected"]) == ["site2"] and "InjectedFault" in rows[0]["rejected"]["site2"]
    )
    assert list(rows[1]["rejected"]) == ["site3"] and "non-finite" in rows[1]["rejected"]["site3"]
    assert [sorted(r["sites"]) for r in rows] == [sorted(r["sites"]) for r in ref.history]
    ours = load_file(str(tmp_path / "flower" / "final.safetensors"))
    for k, v in ref.final_params.items():
        assert (ours[k].double() - v.double()).abs().max().item() <= 1e-6, k


def _check_ledgers(tmp_path, sites_dir):
    replicas = sorted(sites_dir.glob("*.sqlite"))
    assert [p.name.split("-run")[0] for p in replicas] == ["site1", "site2", "site3"]
    # the in-process run and the Flower run both verify, the SuperNodes' replicas included
    for run_dir, extra in ((tmp_path / "inproc", []), (tmp_path / "flower", [sites_dir])):
        v = verify_run(run_dir, replicas=extra)
        assert v.ok, (run_dir.name, [p.describe() for p in v.problems])
        assert len(v.replicas) == 3
    flower = SqliteChain(tmp_path / "flower" / LEDGER_FILE, create=False).entries()
    assert flower[0].data["runtime"] == "FlowerRuntime"
    # round 0: site2 raised, so it signed nothing; round 1: site3's NaN update is signed, then
    # rejected by the coordinator, and its signed entry stays in the chain
    closing = [EntryKind.ROUND, EntryKind.CHECKPOINT]
    assert [e.kind for e in flower] == [
        EntryKind.RUN_START,
        *[EntryKind.UPDATE] * 2,
        *closing,
        *[EntryKind.UPDATE] * 3,
        *closing,
        EntryKind.RUN_END,
    ]
    pinned = flower[0].data["keys"]
    for p in replicas:
        site = p.name.split("-run")[0]
        # every site holds the whole chain, and the run pins the key the site holds
        assert SqliteChain(p, create=False).entries()[-1].hash == flower[-1].hash
        assert pinned[site] == public_hex(load_private_key(sites_dir / f"{site}.key"))
    status = [{s.site: s.status for s in row.sites} for row in round_rows(flower)]
    assert status[0]["site1"] == status[0]["site3"] == "included"
    assert "InjectedFault" in status[0]["site2"]
    assert status[1]["site1"] == status[1]["site2"] == "included"
    assert status[1]["site3"].startswith("rejected: params")


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
