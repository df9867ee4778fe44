"""Peer-to-peer runs (cyclic weight transfer, gossip) end to end on tiny CPU federations."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from medfed.algorithms.base import read_params
from medfed.checkpoint import load_latest
from medfed.config import ConfigError, build_config
from medfed.data.site import Federation
from medfed.engine import FederationError, build_model, run
from medfed.peer import PEER_KEY
from medfed.progress import Reporter
from medfed.seeding import numpy_rng
from medfed.topologies.gossip import choose_site
from medfed.types import params_nbytes
from tests.conftest import make_federation, make_seg_federation

SITES = ["site0", "site1", "site2"]


def cfg(*overrides, rounds=2, faults=()):
    base = [
        f"federation.rounds={rounds}",
        "federation.min_clients=1",
        "model.name=medfed:tinycnn",
        "train.batch_size=16",
        "train.lr=0.05",
        "train.momentum=0",
        "device=cpu",
    ]
    return build_config({"faults": list(faults)}, [*base, *overrides])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fed() -> Federation:
    return make_federation(3, n=24)


def rows_of(path):
    return [json.loads(x) for x in (path / "history.jsonl").read_text().splitlines()]


def dist(a, b):
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def test_cyclic_over_one_site_is_bit_identical_to_local_training(tmp_path, fed):
    """Same init, same (seed, round, site) draws, same code: the cycle adds no arithmetic."""
    one = Federation((fed.site("site1"),))
    cyc = run(cfg("paradigm=cyclic"), out_dir=tmp_path / "c", federation=one, progress=False)
    loc = run(cfg("paradigm=local"), out_dir=tmp_path / "l", federation=one, progress=False)
    for k, v in loc.final_params.items():
        assert torch.equal(v, cyc.final_params[k]), k
    assert all(r["bytes_up"] == 0 for r in cyc.history)  # the model never leaves the site


def test_cyclic_run_records_sites_spread_and_hand_checkable_bytes(tmp_path, fed):
    res = run(cfg("paradigm=cyclic"), out_dir=tmp_path, federation=fed, progress=False)
    rows = rows_of(tmp_path)
    nb = params_nbytes(res.final_params)
    r0, r1 = (row["extra"][PEER_KEY] for row in rows)
    assert r0["order"] == r1["order"] == SITES and rows[0]["participants"] == SITES
    # Cycle 0 starts from the seed-derived model that every site has: K-1 hand-offs. Later
    # cycles also hand the model from the last site back to the first: K.
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"] == 2 * nb
    assert r0["bytes_per_site"] == {"site0": nb, "site1": 2 * nb, "site2": nb}
    assert rows[1]["bytes_up"] == 3 * nb and r1["bytes_per_site"] == dict.fromkeys(SITES, 2 * nb)
    assert set(rows[1]["site_val"]) == set(SITES) and set(r1["site_models"]) == set(SITES)
    for metric in ("auc", "acc"):
        values = [r1["site_models"][s][metric] for s in SITES]
        assert r1["spread"][metric] == pytest.approx(max(values) - min(values))
    assert set(rows[1]["sites"]) == set(SITES) and rows[1]["external"] is not None
    assert rows[1]["val"] == res.summary["val"]
    final = load_file(str(tmp_path / "final.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in res.final_params.items())
    peer = json.loads((tmp_path / "summary.json").read_text())[PEER_KEY]
    assert peer["topology"] == "cyclic" and peer["spread"] == r1["spread"]
    assert peer["bytes_per_site"] == {"site0": 3 * nb, "site1": 4 * nb, "site2": 3 * nb}


def test_cyclic_rejects_a_nan_model_and_the_holder_hands_on_its_own(tmp_path, fed):
    c = cfg("paradigm=cyclic", rounds=1, faults=[{"site": "site1", "kind": "nan"}])
    res = run(c, out_dir=tmp_path, federation=fed, progress=False)
    (row,) = rows_of(tmp_path)
    assert "non-finite" in row["rejected"]["site1"] and set(row["sites"]) == {"site0", "site2"}
    nb = params_nbytes(res.final_params)
    # site0 -> site1 (rejected there), then site0 again -> site2: site1's NaNs never travel.
    assert row["extra"][PEER_KEY]["bytes_per_site"] == {"site0": 2 * nb, "site1": nb, "site2": nb}
    assert all(torch.isfinite(v).all() for v in res.final_params.values() if v.is_floating_point())
    init = read_params(build_model(c, fed))
    site1 = load_latest(tmp_path).client_states["site1"]["model"]
    assert all(torch.equal(site1[k], init[k]) for k in init)  # it keeps the model it had


def test_gossip_rejects_a_nan_model_and_neither_merges_nor_bumps_it(tmp_path, fed):
    bad = choose_site(SITES, numpy_rng(0, "gossip", 0))  # the site that gossips first
    c = cfg("paradigm=gossip", rounds=2, faults=[{"site": bad, "kind": "nan", "rounds": [0]}])
    res = run(c, out_dir=tmp_path, federation=fed, progress=False)
    rows = rows_of(tmp_path)
    assert "non-finite" in rows[0]["rejected"][bad] and rows[1]["rejected"] == {}
    steps = [st for row in rows for st in row["extra"][PEER_KEY]["steps"]]
    assert len(steps) == 6 and steps[0] == {"site": bad, "merged": [], "accepted": False}
    ckpt = load_latest(tmp_path)
    for site in SITES:  # versions count accepted trainings only
        accepted = sum(st["accepted"] for st in steps if st["site"] == site)
        assert int(ckpt.client_states[site]["meta"]["version"]) == accepted
    assert all(torch.isfinite(v).all() for v in res.final_params.values() if v.is_floating_point())


def test_gossip_merging_everything_every_step_approaches_fedavg(tmp_path, fed):
    """On an iid split, pull=all gossip after the same local work as FedAvg (one local training
    per site per round, in expectation) ends near FedAvg's model: the distance between the two,
    relative to how far FedAvg moved from the initial model, shrinks round by round."""
    rounds = 6
    ckpt = {}
    for name in ("federated", "gossip"):
        c = cfg(
            f"paradigm={name}", "peer.pull=all", f"checkpoint.keep_last={rounds}", rounds=rounds
        )
        res = run(c, out_dir=tmp_path / name, federation=fed, progress=False)
        ckpt[name] = [tmp_path / name / "checkpoints" / f"round_{r:04d}" for r in range(rounds)]
        assert res.summary["val"]["auc"] > 0.95
    init = read_params(build_model(c, fed))
    ratios = []
    for fedavg_dir, gossip_dir in zip(ckpt["federated"], ckpt["gossip"], strict=True):
        fedavg = load_file(str(fedavg_dir / "global.safetensors"))
        consensus = load_file(str(gossip_dir / "global.safetensors"))  # the gossip's "global"
        ratios.append(dist(consensus, fedavg) / dist(fedavg, init))
    assert ratios[0] > 0.8  # after one round they differ as much as FedAvg moved (~1.0) ...
    assert ratios[-1] < 0.5 and ratios[-1] < ratios[0] / 2  # ... after six, half as much (~0.4)


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("paradigm", ["cyclic", "gossip"])
def test_resume_after_crash_is_bit_identical(tmp_path, fed, monkeypatch, paradigm):
    c = cfg(f"paradigm={paradigm}", "peer.order=shuffled", rounds=3)  # order: cyclic only
    whole = run(c, out_dir=tmp_path / "whole", federation=fed, progress=False)
    original = Reporter.round_done

    def crash_after_two(self, rec):
        original(self, rec)
        if rec.round == 1:
            raise _Crash()

    monkeypatch.setattr(Reporter, "round_done", crash_after_two)
    with pytest.raises(_Crash):
        run(c, out_dir=tmp_path / "cut", federation=fed, progress=False)
    monkeypatch.setattr(Reporter, "round_done", original)
    resumed = run(c, out_dir=tmp_path / "cut", resume=True, federation=fed, progress=False)
    for k, v in whole.final_params.items():
        assert torch.equal(v, resumed.final_params[k]), k
    assert [r["round"] for r in resumed.history] == [0, 1, 2]
    assert [r["extra"] for r in resumed.history] == [r["extra"] for r in whole.history]


@pytest.mark.slow
def test_cyclic_segmentation_scores_every_site_model(tmp_path):
    c = build_config(
        {},
        [
            "paradigm=cyclic",
            "task=segmentation",
            "federation.rounds=1",
            "model.name=medfed:smallunet",
            "train.batch_size=8",
            "device=cpu",
        ],
    )
    seg = make_seg_federation(2, n=8, external=False)
    res = run(c, out_dir=tmp_path, federation=seg, progress=False)
    (row,) = res.history
    assert set(row["extra"][PEER_KEY]["site_models"]["site1"]) >= {"dice", "jaccard"}
    assert "dice" in row["extra"][PEER_KEY]["spread"] and "dice" in row["val"]


def test_peer_paradigms_refuse_privacy_that_needs_a_server(tmp_path, fed):
    c = cfg("paradigm=gossip", "privacy.dp.mode=local", "privacy.dp.noise_multiplier=1.0")
    with pytest.raises(FederationError, match="need a server"):
        run(c, out_dir=tmp_path, federation=fed, progress=False)


@pytest.mark.parametrize(
    "override,match", [("peer.order=random", "peer.order"), ("peer.seed=1", "unknown key")]
)
def test_peer_options_are_validated(override, match):
    with pytest.raises(ConfigError, match=match):
        cfg("paradigm=cyclic", override)
