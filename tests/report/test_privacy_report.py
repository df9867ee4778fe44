"""The report's Privacy section: shown only when a network trained with DP, its numbers are the
privacy blocks of results.json, the same in HTML and Markdown, and the prose quotes ε with δ."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medfed.report import load_study, write_report
from medfed.report.html import sections
from medfed.report.rounds import read_history
from medfed.report.text import fmt_delta, fmt_epsilon, fmt_sigma, narrative
from medfed.study.privacy import privacy_cost
from tests.report.test_report import DATA_URI, PNG_SIGNATURE, md_rows, summary_of, tables_of

PLAIN, PRIVATE = "U-Net", "U-Net + DP"
DP = {"mode": "dpsgd", "target_epsilon": 8.0, "delta": 1e-5, "clip": 1.0, "accountant": "rdp"}


def _spent(eps: float, sigma: dict[str, float]) -> dict[str, Any]:
    return {
        "mode": "dpsgd",
        "delta": 1e-5,
        "accountant": "rdp",
        "max_epsilon": eps,
        "epsilon": dict.fromkeys(sigma, eps),
        "noise_multiplier": sigma,
        "clip": 1.0,
    }


def make_private(directory: Path, *, twin: bool = True, stopped: str | None = None) -> Path:
    """Turn a fake study of (U-Net, U-Net + DP) into one where the second trained with DP-SGD,
    as the study writer would: meta.privacy, the cost block, and ε in the DP runs' histories."""
    path = directory / "results.json"
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    meta["models"] = {PLAIN: "medfed:smallunet", PRIVATE: "medfed:smallunet"}
    if not twin:
        meta["models"][PLAIN] = "medfed:smallcnn"
    spent = {}
    for p in meta["paradigms"]:
        local = p.startswith("local:")
        sigma = {p.split(":")[1]: 0.9} if local else {"site1": 0.7, "site2": 0.8, "site3": 0.85}
        spent[p] = _spent(6.5 if local else 7.5, sigma)
    meta["privacy"] = {
        PLAIN: {"dp": None, "spent": dict.fromkeys(meta["paradigms"])},
        PRIVATE: {"dp": DP, "spent": spent},
    }
    if stopped:
        meta["privacy"][PRIVATE]["stopped"] = {"federated": stopped}
    doc["privacy"] = privacy_cost(doc)
    path.write_text(json.dumps(doc))
    for p, rel in meta["histories"][PRIVATE].items():
        hist = directory / rel
        rows = [json.loads(line) for line in hist.read_text().splitlines()]
        for r, row in enumerate(rows):
            row["privacy"] = spent[p] | {"max_epsilon": spent[p]["max_epsilon"] * (r + 1) / 3}
        hist.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


@pytest.fixture
def private_study(seg_study_factory: Callable[..., Path]) -> Path:
    return make_private(seg_study_factory(networks=(PLAIN, PRIVATE)))


def _results(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "results.json").read_text())


def test_no_privacy_section_without_dp(seg_study_factory: Callable[..., Path]) -> None:
    directory = seg_study_factory(networks=(PLAIN, PRIVATE))
    # a study written before DP existed, then one whose networks all trained without DP
    for edit in (None, "all off"):
        if edit:
            doc = _results(directory)
            doc["meta"]["privacy"] = {
                n: {"dp": None, "spent": {"federated": None}} for n in doc["meta"]["networks"]
            }
            doc["privacy"] = privacy_cost(doc)
            assert doc["privacy"] == {}
            (directory / "results.json").write_text(json.dumps(doc))
        study = load_study(directory)
        assert not study.privacy.enabled
        assert "privacy" not in dict(sections(study))
        html_path, md_path = write_report(directory)
        html, md = html_path.read_text(), md_path.read_text()
        assert 'id="privacy"' not in html and "ε" not in html
        assert "## Privacy" not in md and "ε" not in md


def test_section_follows_the_others_and_is_in_the_nav(private_study: Path) -> None:
    study = load_study(private_study)
    assert study.privacy.enabled and list(dict(sections(study)))[-1] == "privacy"
    html = write_report(private_study)[0].read_text()
    assert '<a href="#privacy">Privacy</a>' in html
    assert html.index('id="comparisons"') < html.index('<section id="privacy">')


def test_spent_table_shows_epsilon_delta_budget_sigma_and_clip(private_study: Path) -> None:
    html_path, md_path = write_report(private_study)
    rows = tables_of(html_path.read_text())["table-privacy"]
    paradigms = _results(private_study)["meta"]["paradigms"]
    assert [r[1] for r in rows] == [
        p.capitalize() if ":" not in p else f"Local ({p.split(':')[1]})" for p in paradigms
    ]
    fed = rows[paradigms.index("federated")]
    assert fed == [
        PRIVATE,
        "Federated",
        "sample-level DP-SGD",
        "7.50",
        "1e-5",
        "8.00",
        "RDP",
        "0.7–0.85",
        "1",
        "completed",
    ]
    assert rows[paradigms.index("local:site1")][3:8] == ["6.50", "1e-5", "8.00", "RDP", "0.9"]
    assert md_rows(md_path.read_text(), "Table 7. Differential privacy spent") == rows


def test_cost_table_is_the_cost_block_formatted(private_study: Path) -> None:
    html_path, md_path = write_report(private_study)
    doc = _results(private_study)
    rows = tables_of(html_path.read_text())["table-privacy-cost-1"]
    cost = doc["privacy"][PRIVATE]["paradigms"]
    # Federated and centralized: every metric on both pooled splits; local models: Dice only.
    expected_keys = [
        (p, s, m)
        for p in doc["meta"]["paradigms"]
        for s in ("internal", "external")
        for m in (("dice",) if p.startswith("local:") else ("dice", "jaccard", "pixel_acc"))
    ]
    assert len(rows) == len(expected_keys)
    for row, (p, split, metric) in zip(rows, expected_keys, strict=True):
        d = cost[p]["splits"][split][metric]
        assert d["drop"] == pytest.approx(d["without_dp"] - d["with_dp"])
        assert (
            row[2] == {"dice": "Dice", "jaccard": "Jaccard", "pixel_acc": "Pixel accuracy"}[metric]
        )
        if metric == "pixel_acc":
            assert row[3:5] == [f"{100 * d['without_dp']:.1f}%", f"{100 * d['with_dp']:.1f}%"]
            sign = "−" if d["drop"] < 0 else "+"
            assert row[5] == f"{sign}{abs(100 * d['drop']):.1f} pp"
        else:
            assert row[3:5] == [f"{d['without_dp']:.3f}", f"{d['with_dp']:.3f}"]
            assert row[5] == f"{'−' if d['drop'] < 0 else '+'}{abs(d['drop']):.3f}"
        assert row[6] == f"{d['relative_drop_pct']:.1f}%"
        eps = 6.5 if p.startswith("local:") else 7.5
        assert row[7:] == [
            f"{eps:.2f} (1e-5)",
            "sample-level DP-SGD",
            "0.9" if p.startswith("local:") else "0.7–0.85",
            "1",
        ]
    md = md_rows(md_path.read_text(), "Table 8. What DP cost U-Net + DP")
    assert md == rows


def test_what_this_means_quotes_epsilon_delta_and_the_dice_cost(private_study: Path) -> None:
    html = write_report(private_study)[0].read_text()
    d = _results(private_study)["privacy"][PRIVATE]["paradigms"]["federated"]["splits"]
    i, e = d["internal"]["dice"], d["external"]["dice"]

    def effect(x: dict[str, float], where: str) -> str:
        word = "cost" if x["drop"] > 0 else "gained"
        change = "lower" if x["drop"] > 0 else "higher"
        return (
            f"{word} {abs(x['drop']):.3f} Dice on {where}{x['without_dp']:.3f} without DP, "
            f"{x['with_dp']:.3f} with; {abs(x['relative_drop_pct']):.1f}% {change})"
        )

    expected = (
        "Training U-Net federated with sample-level DP-SGD (ε = 7.50 at δ = 1e-5) "
        + effect(i, "internal validation (")
        + " and "
        + effect(e, "external validation (site7: ")
        + "."
    )
    assert expected in summary_of(html)
    assert f"Trained without DP as the reference for {PRIVATE}" in summary_of(html)
    # the performance tables say which rows were trained with DP, and at what ε
    tables = tables_of(html)
    training = [row[1] for row in tables["table-study"] if row[0] == PRIVATE]
    assert "Federated (ε = 7.50)" in training and "Local (site2) (ε = 6.50)" in training
    assert all("ε" not in row[1] for row in tables["table-study"] if row[0] == PLAIN)


def test_epsilon_per_round_figure_is_embedded(private_study: Path) -> None:
    html = write_report(private_study)[0].read_text()
    imgs = dict((alt, src) for src, alt in re.findall(r'<img src="([^"]*)" alt="([^"]*)"', html))
    png = base64.b64decode(imgs[f"Privacy spent per round by {PRIVATE}"].removeprefix(DATA_URI))
    assert png.startswith(PNG_SIGNATURE)
    assert f"Privacy spent per round by {PLAIN}" not in imgs
    for forbidden in ("http://", "https://", "<script"):
        assert forbidden not in html
    study = load_study(private_study)
    points = study.histories[PRIVATE]["federated"]
    assert points is not None and [p.epsilon for p in points] == pytest.approx([2.5, 5.0, 7.5])
    rel = _results(private_study)["meta"]["histories"][PLAIN]["federated"]
    plain = read_history(private_study / rel)
    assert plain is not None and all(p.epsilon is None for p in plain)


def test_without_a_twin_the_cost_is_said_to_be_unmeasured(
    seg_study_factory: Callable[..., Path],
) -> None:
    directory = make_private(
        seg_study_factory(networks=(PLAIN, PRIVATE)),
        twin=False,
        stopped="round 2: privacy budget exhausted",
    )
    assert _results(directory)["privacy"] == {}
    html_path, md_path = write_report(directory)
    html = html_path.read_text()
    tables = tables_of(html)
    assert "table-privacy" in tables and "table-privacy-cost-1" not in tables
    fed = next(r for r in tables["table-privacy"] if r[1] == "Federated")
    assert fed[-1] == "round 2: privacy budget exhausted"
    text = summary_of(html)
    assert "so what DP cost is not measured" in text
    assert "federated ε = 7.50 at δ = 1e-5" in text
    assert "The federated run stopped early: round 2: privacy budget exhausted." in text
    assert "## Privacy" in md_path.read_text()


def test_classification_cost_lists_auc_and_operating_point_metrics(
    study_factory: Callable[..., Path],
) -> None:
    directory = make_private(study_factory(networks=(PLAIN, PRIVATE)))
    tables = tables_of(write_report(directory)[0].read_text())
    metrics = [r[2] for r in tables["table-privacy-cost-1"] if r[0] == "Federated"]
    names = ["AUC", "Accuracy", "Sensitivity", "Specificity", "F1"]
    assert metrics == names * 2  # internal, then external
    acc = next(r for r in tables["table-privacy-cost-1"] if r[2] == "Accuracy")
    assert acc[5].endswith(" pp")
    text = dict(narrative(load_study(directory)))[PRIVATE]
    # one sentence per pooled paradigm (the local-only models are in the table)
    assert text.count("ε = 7.50 at δ = 1e-5") == 2 and "ε = 6.50" not in text
    assert "Training U-Net centralized with" in text and "Training U-Net federated with" in text


@pytest.mark.parametrize(
    ("breakage", "field"),
    [
        (lambda d: d["meta"]["privacy"][PRIVATE].pop("spent"), f"meta.privacy.{PRIVATE}.spent"),
        (
            lambda d: d["meta"]["privacy"][PRIVATE]["spent"]["federated"].update(max_epsilon="8"),
            f"meta.privacy.{PRIVATE}.spent.federated.max_epsilon",
        ),
        (
            lambda d: d["privacy"][PRIVATE].update(twin="nobody"),
            f"privacy.{PRIVATE}",
        ),
        (
            lambda d: d["privacy"][PRIVATE]["paradigms"]["federated"]["splits"]["internal"].pop(
                "dice"
            ),
            f"privacy.{PRIVATE}.paradigms.federated.splits.internal.dice",
        ),
    ],
)
def test_a_malformed_privacy_block_fails_naming_the_field(
    private_study: Path, edit: Any, breakage: Callable[[dict[str, Any]], Any], field: str
) -> None:
    edit(private_study, breakage)
    with pytest.raises(ValueError, match=re.escape(field)):
        load_study(private_study)


def test_formatters() -> None:
    assert fmt_epsilon(7.995) == "8.00" and fmt_epsilon(0.5) == "0.50"
    assert fmt_epsilon(1234.5) == "1,234" and fmt_epsilon(None) == "—"
    assert fmt_epsilon(float("inf")) == "∞"
    assert (
        fmt_delta(1e-5) == "1e-5" and fmt_delta(2.5e-6) == "2.5e-6" and fmt_delta(0.001) == "0.001"
    )
    assert fmt_sigma({}) == "—" and fmt_sigma({"a": 1.1, "b": 1.1}) == "1.1"
    assert fmt_sigma({"a": 0.5, "b": 0.75}) == "0.5–0.75"
