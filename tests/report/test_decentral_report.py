"""The report's "Peer-to-peer and one-shot" section, from hand-written results.json blocks."""

from __future__ import annotations

import base64
import io
import math
from html import unescape
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medfed.report import load_study, write_report
from medfed.report.decentral_view import decentral_tables

SITES = ("site1", "site2", "site3")
GRID = "runs/net0/one_shot/one_shot_synthesis.png"


def _point(auc: float | None, acc: float | None, n: int = 30) -> dict[str, Any]:
    return {"auc": auc, "accuracy": acc, "n": n}


def _peer_block() -> dict[str, Any]:
    """Site models with internal AUC 0.7/0.8/0.9 and accuracy 60/70/80 %, consensus 0.85/75 %."""
    aucs, accs = (0.7, 0.8, 0.9), (0.6, 0.7, 0.8)
    sites = {
        s: {
            "threshold": 0.5,
            "internal": _point(a, c),
            "own_site": _point(a - 0.1, c - 0.1, 10),
            "external": _point(a - 0.05, c),
        }
        for s, a, c in zip(SITES, aucs, accs, strict=True)
    }

    def stats(v: tuple[float, ...]) -> dict[str, float]:
        return {"min": min(v), "max": max(v), "mean": float(np.mean(v)), "std": float(np.std(v))}

    spread = {
        "internal": {"auc": stats(aucs), "accuracy": stats(accs)},
        "own_site": {
            "auc": stats(tuple(a - 0.1 for a in aucs)),
            "accuracy": stats(tuple(c - 0.1 for c in accs)),
        },
        "external": {"auc": stats(tuple(a - 0.05 for a in aucs)), "accuracy": stats(accs)},
    }
    return {
        "topology": "gossip",
        "rounds": 3,
        "bytes_per_site": {"site1": 1_000_000, "site2": 2_000_000, "site3": 3_000_000},
        "consensus": {
            "threshold": 0.5,
            "internal": _point(0.85, 0.75),
            "external": _point(0.8, 0.7),
        },
        "site_models": sites,
        "spread": spread,
        "consensus_minus_mean": {
            "internal": {"auc": 0.05, "accuracy": 0.05},
            "external": {"auc": 0.05, "accuracy": 0.0},
        },
    }


def _row(transfers: int | None, nbytes: int | None, auc: float, rounds: int) -> dict[str, Any]:
    return {
        "transfers_per_site": transfers,
        "bytes_per_site": nbytes,
        "history": "runs/net0/federated/history.jsonl",
        "rounds_done": rounds,
        "internal": {"auc": auc, "accuracy": 0.5},
        "external": {"auc": auc - 0.1, "accuracy": 0.4},
    }


def _one_shot_block(figure: str | None = GRID) -> dict[str, Any]:
    return {
        "teachers": dict.fromkeys(SITES, "medfed:smallcnn"),
        "best_epoch": 2,
        "distill_epochs": 3,
        "selection": "distillation epoch with the best pooled internal validation AUC",
        "synthesis_figure": figure,
        "rows": {
            "one_shot": _row(1, 40_000, 0.61, 1),
            "federated_1_round": _row(2, 80_000, 0.66, 1),
            "federated": _row(6, 240_000, 0.83, 3),
            "centralized": _row(None, None, 0.88, 3),
        },
    }


def _grid_png(directory: Path) -> bytes:
    img = Image.fromarray((np.arange(8 * 12).reshape(8, 12) * 2).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    (directory / GRID).parent.mkdir(parents=True, exist_ok=True)
    (directory / GRID).write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def p2p_study(study_factory, edit):
    directory = study_factory()
    png = _grid_png(directory)

    def add(doc: dict[str, Any]) -> None:
        doc["peer"] = {"SmallCNN": {"gossip": _peer_block()}}
        doc["one_shot"] = {"SmallCNN": _one_shot_block()}

    edit(directory, add)
    return directory, png


def _cells(table) -> list[list[str]]:
    return [[c.text for c in row.cells] for row in table.rows]


def test_a_study_without_the_blocks_has_no_section(written_report):
    directory, html_path, md_path = written_report
    study = load_study(directory)
    assert not study.decentral.enabled and decentral_tables(study) == {}
    assert 'id="decentral"' not in html_path.read_text()
    assert "Peer-to-peer" not in md_path.read_text()


def test_peer_table_shows_site_models_spread_consensus_and_bytes(p2p_study):
    directory, _ = p2p_study
    tables = decentral_tables(load_study(directory))
    assert list(tables) == ["peer-1", "one-shot"]
    rows = _cells(tables["peer-1"])
    by_model = {r[1]: r for r in rows}
    # columns: internal AUC/acc, own-site AUC/acc, external AUC/acc, bytes
    assert by_model["site2"][2:] == [
        "0.800",
        "70.0%",
        "0.700",
        "60.0%",
        "0.750",
        "70.0%",
        "2.00 MB",
    ]
    assert by_model["Site models: min–max"][2:4] == ["0.700–0.900", "60.0%–80.0%"]
    sd = math.sqrt(2 / 3) * 0.1  # population SD of 0.7, 0.8, 0.9
    assert by_model["Site models: mean ± SD"][2] == f"0.800 ± {sd:.3f}"
    assert by_model["Site models: mean ± SD"][-1] == "2.00 MB (mean)"
    assert by_model["Consensus"][2:] == ["0.850", "75.0%", "—", "—", "0.800", "70.0%", "—"]
    assert by_model["Consensus − mean of sites"][2:4] == ["+0.050", "+5.0 pp"]
    assert tables["peer-1"].title.startswith("Table 7. Peer-to-peer, SmallCNN")


def test_one_shot_table_compares_transfers_and_scores(p2p_study):
    directory, _ = p2p_study
    rows = _cells(decentral_tables(load_study(directory))["one-shot"])
    assert [r[1:4] for r in rows] == [
        ["One-shot (FedISCA)", "1", "40.00 kB"],
        ["Federated (fedavg), 1 round", "2", "80.00 kB"],
        ["Federated (fedavg), 3 rounds", "6", "240.00 kB"],
        ["Centralized", "data pooled", "—"],
    ]
    assert [r[4] for r in rows] == ["0.610", "0.660", "0.830", "0.880"]
    assert [r[6] for r in rows] == ["0.510", "0.560", "0.730", "0.780"]  # external AUC


def test_html_embeds_the_grid_and_markdown_links_it(p2p_study):
    directory, png = p2p_study
    html_path, md_path = write_report(directory)
    html = html_path.read_text()
    assert '<section id="decentral">' in html and '<a href="#decentral">' in html
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in html
    assert 'width="96" height="64"' in html  # 12 x 8 px enlarged 8x (the most), whole pixels
    text = unescape(html)
    assert "SmallCNN, gossip: the 3 site models reach internal validation AUC 0.700–0.900" in text
    md = md_path.read_text()
    assert f"]({GRID})" in md and "## Peer-to-peer and one-shot" in md
    assert "Federated (fedavg), 3 rounds (6 transfers per site) 0.830" in md


def test_a_missing_grid_becomes_a_placeholder(p2p_study):
    directory, _ = p2p_study
    (directory / GRID).unlink()
    html_path, md_path = write_report(directory)
    assert f"synthesis grid not found: {GRID}" in html_path.read_text()
    assert "synthesis grid not found" in md_path.read_text()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d["peer"].update(Nope={}), "'peer.Nope'"),
        (lambda d: d["peer"]["SmallCNN"]["gossip"].pop("spread"), "'peer.SmallCNN.gossip.spread'"),
        (
            lambda d: d["one_shot"]["SmallCNN"]["rows"]["federated"].update(internal="x"),
            "'one_shot.SmallCNN.rows.federated.internal.auc'",
        ),
        (
            lambda d: d["one_shot"]["SmallCNN"].update(synthesis_figure="../../etc/passwd"),
            "outside the study directory",
        ),
    ],
)
def test_bad_blocks_fail_naming_the_field(p2p_study, edit, change, needle):
    directory, _ = p2p_study
    edit(directory, change)
    with pytest.raises(ValueError, match=needle):
        load_study(directory)


def test_a_study_without_fedavg_or_an_external_site_shows_what_it_has(study_factory, edit):
    directory = study_factory(external=False)

    def add(doc: dict[str, Any]) -> None:
        peer = _peer_block()
        for model in (peer["consensus"], *peer["site_models"].values()):
            model.pop("external")
        for block in (peer["spread"], peer["consensus_minus_mean"]):
            block.pop("external")
        shot = _one_shot_block(figure=None)
        shot["rows"]["federated_1_round"] = shot["rows"]["federated"] = None
        for row in shot["rows"].values():
            if row is not None:
                row["external"] = None
        doc["peer"] = {"TinyCNN": {"cyclic": peer}}
        doc["one_shot"] = {"TinyCNN": shot}

    edit(directory, add)
    tables = decentral_tables(load_study(directory))
    assert tables["peer-1"].title.startswith("Table 7. Peer-to-peer, TinyCNN")
    assert not any("External" in c for t in tables.values() for c in t.columns)
    assert [r[1] for r in _cells(tables["one-shot"])] == ["One-shot (FedISCA)", "Centralized"]
    html_path, _ = write_report(directory)
    assert "the one-shot run recorded no synthesis grid" in html_path.read_text()
