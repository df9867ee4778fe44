"""Both runtimes write the ledger: over Flower each SuperNode signs its own update and keeps a
replica that agrees with the coordinator's copy, entry for entry."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")

from flwr.simulation import run_simulation  # noqa: E402

from medfed.audit.keys import load_private_key, public_hex  # noqa: E402
from medfed.audit.ledger import EntryKind, SqliteChain  # noqa: E402
from medfed.audit.run import LEDGER_FILE  # noqa: E402
from medfed.audit.summary import round_rows  # noqa: E402
from medfed.audit.verify import verify_run  # noqa: E402
from medfed.config import build_config  # noqa: E402
from medfed.runtime.flower import client  # noqa: E402
from medfed.runtime.flower.server import server_app  # noqa: E402

pytestmark = pytest.mark.slow


def test_flower_and_in_process_runs_write_ledgers_that_verify(tmp_path, monkeypatch, finished_run):
    config = build_config(
        {"faults": [{"site": "site3", "kind": "nan", "rounds": [1]}]},
        [
            "data.ultrasound.scale=0.03",
            "data.ultrasound.num_sites=3",
            "data.ultrasound.image_size=32",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.name=medfed:tinycnn",
            "train.batch_size=16",
            "train.max_steps=2",
            "federation.rounds=2",
            "federation.min_clients=2",
            "device=cpu",
        ],
    )
    sites_dir = tmp_path / "sites"  # each SuperNode's own ledger folder (key + replica)
    monkeypatch.setenv("MEDFED_LEDGER_DIR", str(sites_dir))
    app = server_app(config, out_dir=tmp_path / "flower", num_sites=3, timeout=300, progress=False)
    run_simulation(
        server_app=app,
        client_app=client.app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    replicas = sorted(sites_dir.glob("*.sqlite"))
    assert [p.name.split("-run")[0] for p in replicas] == ["site1", "site2", "site3"]
    # the in-process run (the shared fixture) and the Flower run both verify, replicas included
    for run_dir, extra in ((finished_run, []), (tmp_path / "flower", [sites_dir])):
        v = verify_run(run_dir, replicas=extra)
        assert v.ok, (run_dir.name, [p.describe() for p in v.problems])
        assert len(v.replicas) == 3
    flower = SqliteChain(tmp_path / "flower" / LEDGER_FILE, create=False).entries()
    assert flower[0].data["runtime"] == "FlowerRuntime"
    per_round = [EntryKind.UPDATE] * 3 + [EntryKind.ROUND, EntryKind.CHECKPOINT]
    assert [e.kind for e in flower] == [EntryKind.RUN_START, *per_round * 2, EntryKind.RUN_END]
    pinned = flower[0].data["keys"]
    for p in replicas:
        site = p.name.split("-run")[0]
        # every site holds the whole chain, and the run pins the key the site holds
        assert SqliteChain(p, create=False).entries()[-1].hash == flower[-1].hash
        assert pinned[site] == public_hex(load_private_key(sites_dir / f"{site}.key"))
    rows = round_rows(flower)
    assert [s.status for s in rows[0].sites] == ["included"] * 3
    assert rows[1].sites[2].site == "site3" and rows[1].sites[2].status.startswith(
        "rejected: params"
    )
