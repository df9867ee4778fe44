"""medfed's own app on a real local deployment: SuperLink (TLS + node auth) and 3 SuperNodes on
loopback, each reading its site's data from disk, reproduces the in-process run."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

pytest.importorskip("flwr")

from medfed.config import load_config  # noqa: E402
from medfed.engine import load_federation, run  # noqa: E402
from medfed.runtime.flower import commands  # noqa: E402
from medfed.runtime.flower.certs import generate_dev_certificates  # noqa: E402
from medfed.runtime.flower.deploy import LocalDeployment, NodeSpec, TlsFiles  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = {
    "name": "deploy",
    "device": "cpu",
    "data": {"ultrasound": {"scale": 0.03, "num_sites": 3, "image_size": 32}},
    "model": {"name": "medfed:tinycnn"},
    "train": {"batch_size": 16},
    "federation": {"rounds": 2, "min_clients": 2},
}


def test_deployment_reproduces_the_in_process_run(tmp_path):
    raw = {**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp_path / "cache")}}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    config = load_config(cfg_path)
    fed, _ = load_federation(config.data)  # fills the cache every SuperNode reads from
    ref = run(config, out_dir=tmp_path / "inproc", federation=fed, progress=False)

    certs = generate_dev_certificates(tmp_path / "certs", num_nodes=3)
    tls = TlsFiles(certs.ca_cert, certs.server_cert, certs.server_key)
    nodes = [
        NodeSpec(priv, pub, {"site": site.name, "data-config": str(cfg_path)})
        for (priv, pub), site in zip(certs.node_keys, fed.sites, strict=True)
    ]
    out = tmp_path / "flower-run"
    with LocalDeployment(tmp_path / "deploy", tls=tls, nodes=nodes, startup_timeout=60) as d:
        # exactly what `medfed flower run CONFIG --superlink ... --ca ... --sites 3` does
        result = commands.run(
            cfg_path,
            superlink_address=d.connection.address,
            ca=certs.ca_cert,
            sites=3,
            out=out,
            timeout=120.0,
            home=tmp_path / "flwr-home",
        )
    assert result.ok, (result.status, result.details, result.log[-2000:])
    ours = load_file(str(out / "final.safetensors"))
    for k, v in ref.final_params.items():
        diff = (ours[k].double() - v.double()).abs().max().item() if v.numel() else 0.0
        assert diff <= 1e-6, (k, diff)
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert set(rows[-1]["site_val"]) == {"site1", "site2", "site3"}
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
