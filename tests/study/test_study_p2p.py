"""Peer-to-peer and one-shot paradigms inside ``medfed study``: a tiny six-paradigm study whose
new blocks are recomputed independently from the runs' checkpoints and files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from medfed.client.train import predict_proba
from medfed.config import ConfigError
from medfed.data.site import ArrayDataset, Federation, Site
from medfed.engine import build_model
from medfed.engine import run as run_engine
from medfed.study import build_study_config, load_study_config, run_study
from medfed.study.decentral import _fedavg_traffic, spread
from medfed.types import Paradigm, params_nbytes
from tests.conftest import make_federation

SIX = ["centralized", "local", "federated", "cyclic", "gossip", "one_shot"]
TINY_FEDISCA = {
    "synthesis_iterations": 6,
    "batch_size": 8,
    "rounds": 2,
    "snapshot_every": 2,
    "distill_lr": 0.01,
}
RAW = {
    "name": "tiny-p2p",
    "device": "cpu",
    "networks": [{"label": "Small", "model": {"name": "medfed:smallcnn"}}],
    "paradigms": SIX,
    "budget": {"pooled_epochs": 1},
    "federation": {"rounds": 2, "min_clients": 2},
    # A low learning rate leaves the models apart, so the spread over sites is not all zeros.
    "train": {"batch_size": 16, "lr": 0.01},
    "stats": {"bootstrap_resamples": 60},
    "one_shot": {"fedisca": TINY_FEDISCA},
}
NET = "Small"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("p2p")
        fed = make_federation(3, n=40, size=16)
        config = build_study_config(RAW)
        result = run_study(config, out_dir=out, federation=fed, progress=False)
    finally:
        torch.set_num_threads(threads)
    return result, fed, config


def _run_dir(out: Path, paradigm: str) -> Path:
    return out / "runs" / "small" / paradigm


def _pooled_val(fed: Federation) -> tuple[ArrayDataset, np.ndarray, np.ndarray]:
    sites = [s for s in fed.sites if len(s.val)]
    data = ArrayDataset.concat([s.val for s in sites])
    names = np.concatenate([[s.name] * len(s.val) for s in sites])
    return data, data.labels.numpy(), names


def _scores(config, paradigm: str, fed: Federation, params, data: ArrayDataset) -> np.ndarray:
    run_cfg = config.run_config(config.networks[0], Paradigm(paradigm))
    model = build_model(run_cfg, fed)
    model.load_state_dict(params)
    proba = predict_proba(
        model, data, device=torch.device("cpu"), normalize=run_cfg.train.normalize
    )
    return proba[:, 1]


def _last_checkpoint_sites(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each site's model straight from the newest checkpoint's safetensors files."""
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    out = {}
    for f in sorted((last / "sites").glob("*.safetensors")):
        flat = load_file(str(f))
        out[f.stem] = {
            k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")
        }
    return out


@pytest.mark.slow
def test_results_hold_every_paradigm_scored_on_the_same_cases(study):
    result, fed, config = study
    doc = json.loads((result.out_dir / "results.json").read_text())
    paradigms = [
        "centralized", "local:site0", "local:site1", "local:site2",
        "federated", "cyclic", "gossip", "one_shot",
    ]  # fmt: skip
    assert doc["meta"]["paradigms"] == paradigms
    assert list(doc[NET]) == paradigms
    n_internal = sum(len(s.val) for s in fed.sites)
    for p in ("cyclic", "gossip", "one_shot"):
        assert set(doc[NET][p]) == {
            "internal",
            "external",
            "site:site0",
            "site:site1",
            "site:site2",
        }
        assert doc[NET][p]["internal"]["n"] == n_internal
        assert doc["timing"][NET][p]["train_images"] > 0
    # The main tables score the model each paradigm hands over (final.safetensors): the gossip
    # consensus and the distilled student, recomputed here with scikit-learn.
    data, y, _ = _pooled_val(fed)
    for p in ("gossip", "one_shot"):
        final = load_file(str(_run_dir(result.out_dir, p) / "final.safetensors"))
        s = _scores(config, p, fed, final, data)
        assert doc[NET][p]["internal"]["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    # DeLong against centralized for each new paradigm, on top of FedAvg against everything.
    pairs = {(c["a"], c["b"], c["split"]) for c in doc["comparisons"]}
    for p in ("cyclic", "gossip", "one_shot"):
        assert ("federated", p, "internal") in pairs
        assert (p, "centralized", "internal") in pairs
        assert (p, "centralized", "external") in pairs
    row = next(c for c in doc["comparisons"] if (c["a"], c["b"]) == ("one_shot", "centralized"))
    assert row["auc_a"] == pytest.approx(doc[NET]["one_shot"][row["split"]]["auc"])


@pytest.mark.slow
def test_consensus_is_the_example_weighted_mean_of_the_site_models(study):
    result, fed, _ = study
    weights = {s.name: float(len(s.train)) for s in fed.sites}
    total = sum(weights.values())
    for p in ("cyclic", "gossip"):
        run_dir = _run_dir(result.out_dir, p)
        sites = _last_checkpoint_sites(run_dir)
        final = load_file(str(run_dir / "final.safetensors"))
        for key, value in final.items():
            if not value.is_floating_point():
                continue
            mean = sum(weights[s] * sites[s][key].double() for s in sites) / total
            torch.testing.assert_close(value.double(), mean, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_peer_site_models_and_spread_recomputed_from_the_checkpoints(study):
    result, fed, config = study
    doc = result.results
    data, y, site_of = _pooled_val(fed)
    ext_y = fed.external.val.labels.numpy()
    for p in ("cyclic", "gossip"):
        block = doc["peer"][NET][p]
        aucs, accs = [], []
        for site, params in _last_checkpoint_sites(_run_dir(result.out_dir, p)).items():
            entry = block["site_models"][site]
            s = _scores(config, p, fed, params, data)
            thr = entry["threshold"]
            auc, acc = roc_auc_score(y, s), float(np.mean((s >= thr) == y))
            assert entry["internal"]["auc"] == pytest.approx(auc, abs=1e-9)
            assert entry["internal"]["accuracy"] == pytest.approx(acc, abs=1e-12)
            own = site_of == site
            assert entry["own_site"]["auc"] == pytest.approx(roc_auc_score(y[own], s[own]))
            ext = _scores(config, p, fed, params, fed.external.val)
            assert entry["external"]["auc"] == pytest.approx(roc_auc_score(ext_y, ext), abs=1e-9)
            aucs.append(auc)
            accs.append(acc)
        got = block["spread"]["internal"]
        assert got["auc"]["min"] == pytest.approx(min(aucs))
        assert got["auc"]["max"] == pytest.approx(max(aucs))
        assert got["auc"]["std"] == pytest.approx(np.std(aucs))
        assert got["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        # The consensus row is the main table's model at the main table's threshold rule.
        main = doc[NET][p]["internal"]
        assert block["consensus"]["internal"]["auc"] == pytest.approx(main["auc"])
        assert block["consensus"]["internal"]["accuracy"] == pytest.approx(main["accuracy"])
        assert block["consensus_minus_mean"]["internal"]["auc"] == pytest.approx(
            main["auc"] - np.mean(aucs)
        )
    assert doc["peer"][NET]["gossip"]["spread"]["internal"]["auc"]["std"] > 0


@pytest.mark.slow
def test_bytes_per_site_are_the_runs_and_match_the_cycle_by_hand(study):
    result, fed, config = study
    nbytes = params_nbytes(
        build_model(config.run_config(config.networks[0], Paradigm.CYCLIC), fed).state_dict()
    )
    for p in ("cyclic", "gossip"):
        summary = json.loads((_run_dir(result.out_dir, p) / "summary.json").read_text())
        assert result.results["peer"][NET][p]["bytes_per_site"] == summary["peer"]["bytes_per_site"]
    # Fixed order site0 -> site1 -> site2, 2 cycles: 2 hand-overs in the first (the start model
    # derives from the seed), 3 in the second (site2 hands back to site0).
    assert result.results["peer"][NET]["cyclic"]["bytes_per_site"] == {
        "site0": 3 * nbytes,
        "site1": 4 * nbytes,
        "site2": 3 * nbytes,
    }


@pytest.mark.slow
def test_one_shot_block_reads_the_runs_histories(study):
    result, fed, config = study
    out = result.out_dir
    block = result.results["one_shot"][NET]
    rows = block["rows"]

    def history(p: str) -> list[dict]:
        lines = (_run_dir(out, p) / "history.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    fed_rows = history("federated")
    first, last = fed_rows[0], fed_rows[-1]
    for key, row in (("federated_1_round", first), ("federated", last)):
        assert rows[key]["internal"] == {"auc": row["val"]["auc"], "accuracy": row["val"]["acc"]}
        assert rows[key]["external"] == {
            "auc": row["external"]["auc"],
            "accuracy": row["external"]["acc"],
        }
    shot = history("one_shot")[0]
    assert rows["one_shot"]["internal"]["auc"] == shot["val"]["auc"]
    assert rows["centralized"]["internal"]["auc"] == history("centralized")[-1]["val"]["auc"]
    # The runs' own last-round AUCs are the study's scores of the same models.
    for key in ("one_shot", "federated", "centralized"):
        assert rows[key]["internal"]["auc"] == pytest.approx(
            result.results[NET][key]["internal"]["auc"]
        )
    # Transfers: one upload per site against a download and an upload per FedAvg round.
    rounds = config.federation.rounds
    assert rows["one_shot"]["transfers_per_site"] == 1
    assert rows["federated_1_round"]["transfers_per_site"] == 2
    assert rows["federated"]["transfers_per_site"] == 2 * rounds
    assert rows["centralized"]["transfers_per_site"] is None
    model_bytes = params_nbytes(load_file(str(_run_dir(out, "one_shot") / "final.safetensors")))
    assert rows["one_shot"]["bytes_per_site"] == model_bytes
    assert rows["federated"]["bytes_per_site"] == 2 * rounds * model_bytes
    assert block["synthesis_figure"] == "runs/small/one_shot/one_shot_synthesis.png"
    assert 1 <= block["best_epoch"] <= TINY_FEDISCA["rounds"]


@pytest.mark.slow
def test_report_shows_the_blocks_and_embeds_the_synthesis_grid(study):
    result, _, _ = study
    html = result.report_html.read_text()
    assert '<section id="decentral">' in html
    assert 'id="table-peer-1"' in html and 'id="table-one-shot"' in html
    assert "Federated (fedavg), 1 round" in html and "Federated (fedavg), 2 rounds" in html
    png = (result.out_dir / "runs/small/one_shot/one_shot_synthesis.png").read_bytes()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in html
    md = result.report_md.read_text()
    assert "## Peer-to-peer and one-shot" in md
    assert "(runs/small/one_shot/one_shot_synthesis.png)" in md
    assert "| Gossip | Consensus |" in md.replace("↳ ", "")


@pytest.mark.slow
def test_rerun_rebuilds_the_blocks_from_the_files_without_training(study, monkeypatch):
    result, fed, config = study
    import medfed.study.runs as runs

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "run_engine", boom)
    again = run_study(config, out_dir=result.out_dir, federation=fed, progress=False, report=False)
    for block in ("peer", "one_shot"):
        assert again.results[block] == result.results[block]


def test_the_p2p_preset_is_a_six_paradigm_study():
    config = load_study_config(Path(__file__).parents[2] / "configs/study-p2p.yaml")
    assert [str(p) for p in config.paradigms] == SIX
    assert config.networks[0].model.name == "medfed:smallcnn"  # BatchNorm, as FedISCA needs


@pytest.mark.slow
def test_one_shot_selection_never_sees_the_external_site_or_a_test_split(tmp_path):
    """Flipping every external label and adding a mislabelled test split changes nothing the
    one-shot run selects: the distillation epoch is chosen on internal validation only."""
    fed = make_federation(3, n=32, size=16)
    ext = fed.external
    flipped = ArrayDataset(images=ext.val.images, labels=1 - ext.val.labels)
    mislabelled = [ArrayDataset(images=s.val.images, labels=1 - s.val.labels) for s in fed.sites]
    poisoned = Federation(
        tuple(
            Site(s.name, s.train, s.val, test=t)
            for s, t in zip(fed.sites, mislabelled, strict=True)
        ),
        Site(ext.name, flipped, flipped),
    )
    study_config = build_study_config(RAW)
    config = study_config.run_config(study_config.networks[0], Paradigm.ONE_SHOT)
    a = run_engine(config, out_dir=tmp_path / "a", federation=fed, progress=False)
    b = run_engine(config, out_dir=tmp_path / "b", federation=poisoned, progress=False)
    assert a.summary["one_shot"]["best_epoch"] == b.summary["one_shot"]["best_epoch"]
    assert a.summary["one_shot"]["validation"] == b.summary["one_shot"]["validation"]
    for key, value in a.final_params.items():
        torch.testing.assert_close(value, b.final_params[key])


# --- config ---


def test_a_study_with_all_six_paradigms_validates_and_passes_its_options_on():
    raw = RAW | {"peer": {"order": "shuffled", "pull": "all"}}
    config = build_study_config(raw)
    assert [str(p) for p in config.paradigms] == SIX
    net = config.networks[0]
    run = config.run_config(net, Paradigm.GOSSIP)
    assert str(run.peer.order) == "shuffled" and str(run.peer.pull) == "all"
    shot = config.run_config(net, Paradigm.ONE_SHOT)
    assert shot.one_shot.fedisca.synthesis_iterations == TINY_FEDISCA["synthesis_iterations"]
    # Equal budgets: a peer round trains every site once, like a full FedAvg round.
    for p in (Paradigm.CYCLIC, Paradigm.GOSSIP, Paradigm.ONE_SHOT):
        assert config.run_config(net, p).train.epochs == pytest.approx(1 / 2)


@pytest.mark.parametrize("paradigm", ["cyclic", "gossip", "one_shot"])
def test_a_segmentation_study_refuses_the_paradigms_it_cannot_report(paradigm):
    raw = RAW | {
        "task": "segmentation",
        "networks": [{"label": "U", "model": {"name": "medfed:smallunet"}}],
        "paradigms": ["federated", paradigm],
    }
    with pytest.raises(ConfigError, match=rf"\['{paradigm}'\].*classification studies only"):
        build_study_config(raw)


def test_dp_with_a_serverless_paradigm_is_a_config_error_naming_the_network():
    raw = RAW | {
        "paradigms": ["federated", "gossip"],
        "privacy": {"dp": {"mode": "local", "noise_multiplier": 1.0, "clip": 1.0}},
    }
    with pytest.raises(ConfigError, match=r"network 'Small'.*need a server"):
        build_study_config(raw)


# --- pure helpers ---


@given(st.lists(st.one_of(st.none(), st.floats(0, 1)), max_size=8))
def test_spread_matches_numpy_on_the_defined_values(values):
    got = spread(values)
    defined = [v for v in values if v is not None]
    if not defined:
        assert all(v is None for v in got.values())
        return
    assert got["min"] == min(defined) and got["max"] == max(defined)
    assert got["mean"] == pytest.approx(np.mean(defined))
    assert got["std"] == pytest.approx(np.std(defined))


@given(st.lists(st.sets(st.sampled_from(["a", "b", "c"]), min_size=1), min_size=1, max_size=6))
def test_fedavg_traffic_counts_two_transfers_per_round_taken_part_in(rounds):
    rows = [
        {
            "participants": sorted(people),
            "bytes_up": 10 * len(people),
            "bytes_down": 10 * len(people),
        }
        for people in rounds
    ]
    transfers, nbytes = _fedavg_traffic(rows)
    most = max(sum(site in people for people in rounds) for site in "abc")
    assert transfers == 2 * most
    assert nbytes == 20 * most
