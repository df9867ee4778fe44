"""Peer-to-peer and one-shot models in the per-site table and figure and in "What this means".

The study is the shared fake one with hand-chosen AUCs, CIs and DeLong rows added for cyclic,
gossip and one-shot; every expected string below is written out from those numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import struct
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.report import load_study, write_report
from medfed.report.figures import DPI, site_figure
from medfed.report.load import Comparison, Study
from medfed.report.tables import site_table
from medfed.report.text import narrative
from tests.report.conftest import make_study
from tests.report.test_decentral_report import _one_shot_block, _peer_block

DECENTRAL = ("cyclic", "gossip", "one_shot")
SPLITS = ("internal", "external", "site:site1", "site:site2", "site:site3")
# Hand-chosen AUCs of the model each paradigm hands over; every CI is [auc - 0.1, auc + 0.05],
# capped at 1.
AUCS = {
    "cyclic": (0.812, 0.701, 0.75, 0.66, 0.9),
    "gossip": (0.99, 0.999, 0.98, 0.97, 0.96),
    "one_shot": (0.5, 0.45, 0.52, 0.48, 0.55),
}
# DeLong p-values of federated vs each model, internal then external.
P_VALUES = {"cyclic": (0.41, 0.052), "gossip": (0.003, 0.049), "one_shot": (0.0004, 0.7)}


def _ci(auc: float) -> str:
    return f"[{auc - 0.1:.3f}–{min(auc + 0.05, 1.0):.3f}]"


def _add_decentral(doc: dict[str, Any], *, external: bool = True) -> None:
    """Add the three paradigms' results, comparisons, timing and peer/one-shot blocks."""
    splits = SPLITS if external else SPLITS[:1] + SPLITS[2:]
    for net in doc["meta"]["networks"]:
        fed = doc[net]["federated"]
        for p in DECENTRAL:
            aucs = dict(zip(SPLITS, AUCS[p], strict=True))
            doc[net][p] = {}
            for split in splits:
                entry = copy.deepcopy(fed[split])
                entry["auc"], entry["auc_ci"] = (
                    aucs[split],
                    [aucs[split] - 0.1, min(aucs[split] + 0.05, 1.0)],
                )
                doc[net][p][split] = entry
            doc["timing"][net][p] = copy.deepcopy(doc["timing"][net]["federated"])
            for split, pv in zip(("internal", "external"), P_VALUES[p], strict=False):
                if split not in splits:
                    continue
                a = fed[split]["auc"]
                doc["comparisons"].append(
                    {
                        "network": net,
                        "split": split,
                        "a": "federated",
                        "b": p,
                        "auc_a": a,
                        "auc_b": aucs[split],
                        "difference": a - aucs[split],
                        "z": 1.0,
                        "p_value": pv,
                    }
                )
    doc["meta"]["paradigms"] += list(DECENTRAL)
    peer = _peer_block()  # site models 0.7/0.8/0.9 on internal validation
    peer["consensus"]["internal"]["auc"] = AUCS["cyclic"][0]
    peer["consensus_minus_mean"]["internal"]["auc"] = AUCS["cyclic"][0] - 0.8
    if not external:
        for model in (peer["consensus"], *peer["site_models"].values()):
            model.pop("external")
        for block in (peer["spread"], peer["consensus_minus_mean"]):
            block.pop("external")
    doc["peer"] = {"SmallCNN": {"cyclic": peer}}
    doc["one_shot"] = {"SmallCNN": _one_shot_block(figure=None)}  # 0.61 / 0.66 / 0.83


@pytest.fixture
def p2p_dir(study_factory, edit) -> Path:
    directory = study_factory()
    edit(directory, _add_decentral)
    return directory


@pytest.fixture(scope="module")
def p2p(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """Read-only: the study the property tests vary in memory."""
    from tests.report.conftest import edit_results

    directory = make_study(tmp_path_factory.mktemp("p2p") / "study")
    edit_results(directory, _add_decentral)
    return load_study(directory)


def _fed(study: Study, net: str, split: str) -> tuple[float, str]:
    m = study.metrics(net, "federated", split)
    auc, ci = m.value("auc"), m.ci("auc")
    assert auc is not None and ci is not None and ci[0] is not None and ci[1] is not None
    return auc, f"[{ci[0]:.3f}–{ci[1]:.3f}]"


def _png_width(png: bytes) -> int:
    return int(struct.unpack(">I", png[16:20])[0])


def _paragraphs(study: Study) -> dict[str, str]:
    return dict(narrative(study))


# --- per-site table and figure ---


def test_site_table_adds_the_handed_over_models_and_the_external_site(p2p_dir):
    study = load_study(p2p_dir)
    table = site_table(study)
    per_net = (
        "Centralized",
        "Federated",
        "Cyclic (consensus)",
        "Gossip (consensus)",
        "One-shot (student)",
        "Local (own site)",
    )
    assert table.columns == ("Site", "n (malignant)", *per_net, *per_net)
    assert (
        table.title == "Table 3. AUC on each site's own validation split and on the external site"
    )
    rows = {r.cells[0].text: r.cells for r in table.rows}
    assert list(rows) == ["site1", "site2", "site3", "site7 (external)"]
    for k, split in enumerate(SPLITS):
        if split == "internal":
            continue  # pooled: Table 1's, not a row here
        name = "site7 (external)" if split == "external" else split.removeprefix("site:")
        for j, p in enumerate(DECENTRAL):
            for n_idx in range(2):  # both networks carry the same hand values
                cell = rows[name][2 + 6 * n_idx + 2 + j]
                assert (cell.text, cell.ci) == (f"{AUCS[p][k]:.3f}", _ci(AUCS[p][k]))
    ext = rows["site7 (external)"]
    m = study.metrics("SmallCNN", "centralized", "external")
    assert ext[1].text == f"{m.n} ({m.n_pos})"
    assert ext[2].text == f"{m.value('auc'):.3f}"
    assert ext[7].text == "—"  # the external site trained no local model
    assert (
        rows["site2"][7].text
        == f"{study.metrics('SmallCNN', 'local:site2', 'site:site2').value('auc'):.3f}"
    )
    assert "student (one-shot)" in table.note and "trained no model of its own" in table.note


def test_site_table_shows_only_the_paradigms_the_study_has(study_factory, edit):
    directory = study_factory(external=False)

    def only_gossip(doc: dict[str, Any]) -> None:
        _add_decentral(doc, external=False)
        doc["meta"]["paradigms"] = [
            p for p in doc["meta"]["paradigms"] if p not in ("cyclic", "one_shot")
        ]
        doc["comparisons"] = [
            c
            for c in doc["comparisons"]
            if c["b"] in ("centralized", "gossip") or c["b"].startswith("local")
        ]
        doc.pop("peer")
        doc.pop("one_shot")

    edit(directory, only_gossip)
    table = site_table(load_study(directory))
    assert table.columns[2:6] == (
        "Centralized",
        "Federated",
        "Gossip (consensus)",
        "Local (own site)",
    )
    assert [r.cells[0].text for r in table.rows] == ["site1", "site2", "site3"]  # no external
    assert table.title == "Table 3. AUC on each site's own validation split"
    assert [r.cells[4].text for r in table.rows] == [f"{a:.3f}" for a in AUCS["gossip"][2:]]


def test_site_figure_widens_for_the_extra_bars_and_the_external_group(p2p_dir, written_report):
    # figsize = max(4.4, per-group inches × groups + 1.6) at DPI: 3 bars × 3 sites stay at 4.4 in;
    # 6 bars (0.25 in each) × 4 groups (3 sites + external) = 7.6 in.
    assert _png_width(site_figure(load_study(written_report[0]), "SmallCNN")) == round(4.4 * DPI)
    assert _png_width(site_figure(load_study(p2p_dir), "SmallCNN")) == round(7.6 * DPI)


def test_html_and_markdown_carry_the_new_columns_caption_and_paragraph(p2p_dir):
    html_path, md_path = write_report(p2p_dir)
    html = unescape(html_path.read_text())
    assert (
        "AUC on each site's own validation split and on the external site (site7) with 95% CI"
        in html
    )
    assert "Hatched: the consensus of the site models (cyclic, gossip)" in html
    assert (
        "<strong>SmallCNN, peer-to-peer and one-shot:</strong> Cyclic consensus AUC 0.812" in html
    )
    md = md_path.read_text()
    assert "| site7 (external) | " in md
    assert "**SmallCNN, peer-to-peer and one-shot:** Cyclic consensus AUC 0.812" in md


# --- "What this means" ---


def test_consensus_and_student_are_read_against_federated_with_their_tests(p2p_dir):
    study = load_study(p2p_dir)
    text = _paragraphs(study)["SmallCNN, peer-to-peer and one-shot"]
    fi, fi_ci = _fed(study, "SmallCNN", "internal")
    fe, fe_ci = _fed(study, "SmallCNN", "external")
    # preconditions of the words below
    assert AUCS["one_shot"][0] < fi < AUCS["gossip"][0] and fe < AUCS["gossip"][1]

    def d(x: float) -> str:
        return f"{'−' if x < 0 else '+'}{abs(x):.3f}"

    a, e = AUCS["cyclic"][:2]
    assert (
        f"Cyclic consensus AUC {a:.3f} {_ci(a)} vs federated {fi:.3f} {fi_ci} on internal "
        f"validation (consensus − federated {d(a - fi)}): no significant difference (p = 0.410); "
        f"on the external site (site7): {e:.3f} {_ci(e)} vs {fe:.3f} {fe_ci} (consensus − "
        f"federated {d(e - fe)}): no significant difference (p = 0.052)."
    ) in text
    a, e = AUCS["gossip"][:2]
    assert (
        f"Gossip consensus AUC {a:.3f} {_ci(a)} vs federated {fi:.3f} {fi_ci} on internal "
        f"validation (consensus − federated {d(a - fi)}): significantly higher (p = 0.003)"
    ) in text
    assert f"(consensus − federated {d(e - fe)}): significantly higher (p = 0.049)." in text
    a = AUCS["one_shot"][0]
    assert (
        f"One-shot student AUC {a:.3f} {_ci(a)} vs federated {fi:.3f} {fi_ci} on internal "
        f"validation (student − federated {d(a - fi)}): significantly lower (p < 0.001)"
    ) in text


def test_peer_spread_and_one_shot_rounds_are_read_from_their_blocks(p2p_dir):
    text = _paragraphs(load_study(p2p_dir))["SmallCNN, peer-to-peer and one-shot"]
    # site models 0.7, 0.8, 0.9: population SD 0.0816; consensus 0.812 − mean 0.8
    assert (
        "The 3 cyclic site models span internal validation AUC 0.700–0.900 (SD 0.082); the "
        "consensus (0.812) lies within their range (+0.012 against their mean)."
    ) in text
    assert (
        "In the runs' own validation records (not tested for significance), one-shot's internal "
        "validation AUC 0.610 (1 transfer per site) is lower than federated (fedavg) after 1 round "
        "(0.660; 2 transfers per site) and lower than after 3 rounds (0.830; 6 transfers per site)."
    ) in text
    # the gossip run wrote no peer block: no spread sentence is made up for it
    assert "gossip site models" not in text


@pytest.mark.parametrize(
    ("consensus", "words"),
    [
        (0.95, "lies above every site model"),
        (0.65, "lies below every site model"),
        (0.9004, "lies within their range"),  # equal to the best site model as printed
    ],
)
def test_consensus_position_is_judged_as_printed(p2p, consensus, words):
    run = p2p.decentral.peer[0]
    point = dataclasses.replace(run.consensus.at("internal"), auc=consensus)
    run = dataclasses.replace(
        run, consensus=dataclasses.replace(run.consensus, splits={"internal": point})
    )
    study = dataclasses.replace(p2p, decentral=dataclasses.replace(p2p.decentral, peer=(run,)))
    assert (
        f"the consensus ({consensus:.3f}) {words}"
        in _paragraphs(study)["SmallCNN, peer-to-peer and one-shot"]
    )


def test_one_shot_above_fedavg_after_one_round_says_so(p2p):
    shot = p2p.decentral.one_shot[0]
    row = shot.rows["one_shot"]
    assert row is not None
    better = dataclasses.replace(row, internal=dataclasses.replace(row.internal, auc=0.7))
    study = dataclasses.replace(
        p2p,
        decentral=dataclasses.replace(
            p2p.decentral,
            one_shot=(dataclasses.replace(shot, rows={**shot.rows, "one_shot": better}),),
        ),
    )
    text = _paragraphs(study)["SmallCNN, peer-to-peer and one-shot"]
    assert "AUC 0.700 (1 transfer per site) is higher than federated (fedavg) after 1 round" in text
    assert "and lower than after 3 rounds (0.830" in text


@settings(max_examples=40, deadline=None)
@given(
    p=st.floats(0.0, 1.0),
    diff=st.floats(0.001, 0.3) | st.floats(-0.3, -0.001),
)
def test_only_a_significant_test_is_called_higher_or_lower(p2p, p, diff):
    """Federated − cyclic = ``diff`` with p-value ``p``: the words follow the test, the sign the
    difference (negated: the sentence reads consensus − federated)."""
    key = ("SmallCNN", "internal", "federated", "cyclic")
    kept = tuple(c for c in p2p.comparisons if (c.network, c.split, c.a, c.b) != key)
    test = Comparison(*key, 0.8, 0.8 - diff, diff, 1.0, p)
    text = _paragraphs(dataclasses.replace(p2p, comparisons=(*kept, test)))[
        "SmallCNN, peer-to-peer and one-shot"
    ]
    internal = text[: text.index("; on the external site")]
    shown = f"{'−' if diff > 0 else '+'}{abs(diff):.3f}"
    assert f"(consensus − federated {shown})" in internal
    if p >= 0.05:
        assert "no significant difference" in internal and "significantly" not in internal
    else:
        word = "lower" if diff > 0 else "higher"
        assert f"): significantly {word} (p " in internal


def test_without_fedavg_the_models_are_read_against_centralized(study_factory, edit):
    directory = study_factory(external=False)

    def drop_fedavg(doc: dict[str, Any]) -> None:
        _add_decentral(doc, external=False)
        doc["meta"]["paradigms"] = ["centralized", "cyclic"]
        doc["comparisons"] = [
            {
                "network": "SmallCNN",
                "split": "internal",
                "a": "cyclic",
                "b": "centralized",
                "auc_a": 0.812,
                "auc_b": 0.79,
                "difference": 0.022,
                "z": 0.5,
                "p_value": 0.6,
            }
        ]
        doc.pop("one_shot")

    edit(directory, drop_fedavg)
    study = load_study(directory)
    cen = study.metrics("SmallCNN", "centralized", "internal")
    ci = cen.ci("auc")
    assert ci is not None and ci[0] is not None and ci[1] is not None
    paragraphs = _paragraphs(study)
    assert paragraphs["SmallCNN"].startswith("This study trained no federated model")
    assert paragraphs["SmallCNN, peer-to-peer and one-shot"].startswith(
        f"Cyclic consensus AUC 0.812 {_ci(0.812)} vs centralized {cen.value('auc'):.3f} "
        f"[{ci[0]:.3f}–{ci[1]:.3f}] on internal validation (consensus − centralized +0.022): no "
        "significant difference (p = 0.600)."
    )
    # TinyCNN has neither a test against centralized nor a peer block: values only, untested
    assert paragraphs["TinyCNN, peer-to-peer and one-shot"] == (
        f"Cyclic consensus AUC 0.812 {_ci(0.812)} on internal validation (not tested)."
    )


def test_a_study_without_these_paradigms_reads_as_before(written_report):
    directory, html_path, md_path = written_report
    study = load_study(directory)
    assert [name for name, _ in narrative(study)] == ["SmallCNN", "TinyCNN"]
    table = site_table(study)
    per_net = ("Centralized", "Federated", "Local (own site)")
    assert table.columns == ("Site", "n (malignant)", *per_net, *per_net)
    assert table.title == "Table 3. AUC on each site's own validation split"
    assert table.note == "AUC [95% CI]. Local (own site): the model trained at that site alone."
    html = unescape(html_path.read_text())
    assert (
        "SmallCNN: AUC on each site's own validation split with 95% CI; dashed line: chance.<"
        in html
    )
    assert "Hatched" not in html and "peer-to-peer and one-shot:" not in html
    assert "peer-to-peer" not in md_path.read_text()
