"""The study report: self-contained, consistent with results.json, honest in its wording."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections.abc import Callable
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medfed.report import write_report
from medfed.report.__main__ import main
from medfed.report.figures import roc_points
from medfed.report.text import fmt_bytes, fmt_diff, fmt_p, p_phrase, verdict

Edit = Callable[[Path, Callable[[dict[str, Any]], None]], None]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = "data:image/png;base64,"


class _Tables(HTMLParser):
    """Tables by id as rows of cell text, rowspans expanded (the network cell spans its rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._id: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_body = False
        self._spans: dict[int, tuple[str, int]] = {}
        self._span = 1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._id = a.get("id") or ""
            self.tables[self._id] = []
            self._spans = {}
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._span = int(a.get("rowspan") or 1)
        elif tag == "span" and self._cell is not None:
            self._cell.append(" ")

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            while len(self._row) in self._spans:  # cells carried down from a rowspan above
                self._fill()
            text = " ".join("".join(self._cell).split())
            if self._span > 1:
                self._spans[len(self._row)] = (text, self._span - 1)
            self._row.append(text)
            self._cell = None
        elif tag == "tr" and self._row is not None and self._id is not None:
            while len(self._row) in self._spans:
                self._fill()
            self.tables[self._id].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def _fill(self) -> None:
        assert self._row is not None
        col = len(self._row)
        text, left = self._spans[col]
        self._row.append(text)
        if left > 1:
            self._spans[col] = (text, left - 1)
        else:
            del self._spans[col]


def tables_of(html_text: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(html_text)
    return parser.tables


def summary_of(html_text: str) -> str:
    match = re.search(r'<div class="summary">(.*?)</div>', html_text, re.S)
    assert match, "no 'What this means' block"
    return unescape(re.sub(r"<[^>]+>", "", match.group(1)))


def results_of(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "results.json").read_text())


def md_rows(md_text: str, title: str) -> list[list[str]]:
    """Body rows of the Markdown table under ``**title...**``, cells unescaped."""
    lines = md_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"**{title}"))
    rows = []
    for line in lines[start + 4 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append([unescape(c.replace("\\", "")).removeprefix("↳ ") for c in cells])
    return rows


def test_writes_both_files_into_the_study_dir(written_report: tuple[Path, Path, Path]) -> None:
    directory, html_path, md_path = written_report
    assert (html_path, md_path) == (directory / "report.html", directory / "report.md")
    assert html_path.stat().st_size > 10_000 and md_path.stat().st_size > 1_000


def test_html_is_self_contained(written_report: tuple[Path, Path, Path]) -> None:
    text = written_report[1].read_text()
    for forbidden in ("http://", "https://", 'src="file:', "url(", "<script", "<link"):
        assert forbidden not in text, forbidden
    for src in re.findall(r'src="([^"]*)"', text):
        assert src.startswith(DATA_URI)
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


def test_every_image_is_an_embedded_png(written_report: tuple[Path, Path, Path]) -> None:
    text = written_report[1].read_text()
    srcs = re.findall(r'<img src="([^"]*)"', text)
    assert len(srcs) == text.count("<img") == 3 * 2  # ROC, learning, per-site for 2 networks
    for src in srcs:
        png = base64.b64decode(src.removeprefix(DATA_URI), validate=True)
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_study_table_has_every_model_with_its_auc(written_report: tuple[Path, Path, Path]) -> None:
    directory, html_path, _ = written_report
    results = results_of(directory)
    rows = {(r[0], r[1]): r for r in tables_of(html_path.read_text())["table-study"]}
    expected_rows = [
        (net, p.capitalize() if ":" not in p else f"Local ({p.split(':')[1]})")
        for net in results["meta"]["networks"]
        for p in results["meta"]["paradigms"]
    ]
    assert list(rows) == expected_rows
    for (net, _), row in zip(expected_rows, rows.values(), strict=True):
        paradigm = results["meta"]["paradigms"][expected_rows.index((net, row[1])) % 5]
        for col, split in ((2, "internal"), (6, "external")):
            m = results[net][paradigm][split]
            lo, hi = m["auc_ci"]
            assert row[col] == f"{m['auc']:.3f} [{lo:.3f}–{hi:.3f}]"
            assert row[col + 1].startswith(f"{100 * m['accuracy']:.1f}%")


def test_predictive_table_and_null_metric_renders_as_dash(study_factory: Any, edit: Edit) -> None:
    directory = study_factory()

    def no_ppv(r: dict[str, Any]) -> None:
        m = r["TinyCNN"]["federated"]["internal"]
        m["ppv"], m["ppv_ci"], m["f1"], m["f1_ci"] = None, None, None, [None, None]

    edit(directory, no_ppv)
    html_path, md_path = write_report(directory)
    row = next(
        r
        for r in tables_of(html_path.read_text())["table-predictive"]
        if r[:2] == ["TinyCNN", "Federated"]
    )
    assert row[2] == "—" and row[4] == "—"
    assert row[3].endswith("]")  # NPV untouched, with its interval
    md_row = next(r for r in md_rows(md_path.read_text(), "Table 2") if r[:2] == row[:2])
    assert md_row[2] == "—" and md_row[4] == "—"


def _set_comparison(results: dict[str, Any], net: str, split: str, diff: float, p: float) -> None:
    for c in results["comparisons"]:
        if (c["network"], c["split"], c["b"]) == (net, split, "centralized"):
            c["difference"], c["p_value"] = diff, p


def test_what_this_means_quotes_the_numbers_and_words_significance(
    study_factory: Any, edit: Edit
) -> None:
    directory = study_factory()

    def cases(r: dict[str, Any]) -> None:
        _set_comparison(r, "SmallCNN", "internal", -0.04, 0.003)
        _set_comparison(r, "SmallCNN", "external", 0.01, 0.21)
        _set_comparison(r, "TinyCNN", "internal", 0.05, 0.0004)
        _set_comparison(r, "TinyCNN", "external", -0.02, 0.049)

    edit(directory, cases)
    html_path, md_path = write_report(directory)
    text = summary_of(html_path.read_text())
    small, tiny = text.split("TinyCNN:")
    r = results_of(directory)
    fed, cen = r["SmallCNN"]["federated"]["internal"], r["SmallCNN"]["centralized"]["internal"]
    assert (
        f"Federated AUC {fed['auc']:.3f} [{fed['auc_ci'][0]:.3f}–{fed['auc_ci'][1]:.3f}] vs "
        f"centralized {cen['auc']:.3f} [{cen['auc_ci'][0]:.3f}–{cen['auc_ci'][1]:.3f}] "
        "on internal validation (difference −0.040): significantly lower (p = 0.003)."
    ) in small
    ext = r["SmallCNN"]["federated"]["external"]["auc"]
    assert f"On the external site (site7): {ext:.3f}" in small
    assert "(difference +0.010): no significant difference (p = 0.210)." in small
    assert (
        "outside 0.03 AUC of centralized on internal validation, but within it on the external"
        in small
    )
    assert "significantly higher (p < 0.001)" in tiny
    assert "(difference −0.020): significantly lower (p = 0.049)" in tiny
    assert "outside 0.03 AUC of centralized on internal validation, but within it" in tiny
    mean_local = np.mean(
        [r["SmallCNN"][f"local:{s}"]["internal"]["auc"] for s in ("site1", "site2", "site3")]
    )
    assert f"the mean local-only model ({mean_local:.3f})" in small
    md = md_path.read_text()
    assert "significantly lower (p = 0.003)" in md and "no significant difference (p = 0.210)" in md


def test_network_names_are_escaped(study_factory: Any) -> None:
    directory = study_factory(networks=("<b>x</b>", "A&B"))
    html_path, md_path = write_report(directory)
    html_text, md_text = html_path.read_text(), md_path.read_text()
    assert "<b>x</b>" not in html_text and "&lt;b&gt;x&lt;/b&gt;" in html_text
    assert "A&amp;B" in html_text and "A&B" not in html_text
    assert "<b>x</b>" not in md_text and "&lt;b&gt;x&lt;/b&gt;" in md_text
    assert [r[0] for r in tables_of(html_text)["table-study"]][:1] == ["<b>x</b>"]


def test_missing_history_gives_a_placeholder_not_a_crash(study_factory: Any) -> None:
    directory = study_factory()
    meta = results_of(directory)["meta"]
    for rel in meta["histories"]["TinyCNN"].values():
        (directory / rel).unlink()
    (directory / meta["histories"]["SmallCNN"]["centralized"]).unlink()
    html_text = write_report(directory)[0].read_text()
    assert html_text.count('<div class="placeholder">') == 1
    assert "TinyCNN: no history recorded" in html_text
    assert html_text.count("<img") == 3 * 2 - 1  # SmallCNN's curve still drawn from FL alone


def test_no_external_site(study_factory: Any) -> None:
    directory = study_factory(external=False)
    html_path, md_path = write_report(directory)
    html_text = html_path.read_text()
    assert "External validation" not in html_text and "external site" not in summary_of(html_text)
    assert len(tables_of(html_text)["table-study"][0]) == 2 + 4
    assert (
        "External validation" not in md_path.read_text()
        and "External AUC" not in md_path.read_text()
    )


def test_markdown_has_the_same_table_rows(written_report: tuple[Path, Path, Path]) -> None:
    _, html_path, md_path = written_report
    html_tables, md_text = tables_of(html_path.read_text()), md_path.read_text()
    titles = {
        "table-study": "Table 1",
        "table-predictive": "Table 2",
        "table-sites": "Table 3",
        "table-communication": "Table 4",
        "table-timing": "Table 5",
        "table-comparisons": "Table 6",
    }
    assert set(html_tables) == set(titles)
    for key, title in titles.items():
        assert md_rows(md_text, title) == html_tables[key], key
    assert "## What this means" in md_text and "![" not in md_text
    assert "Local (all sites)" in md_text


def test_budget_communication_and_timing(written_report: tuple[Path, Path, Path]) -> None:
    directory, html_path, _ = written_report
    html_text = html_path.read_text()
    assert "Every paradigm saw 1,440 training images = 3 pooled epochs" in html_text
    tables = tables_of(html_text)
    assert tables["table-communication"][0] == [
        "SmallCNN",
        "3",
        "3.50 MB",
        "3.50 MB",
        "7.00 MB",
        "10.50 MB",
    ]
    timing = results_of(directory)["timing"]["SmallCNN"]
    local = next(r for r in tables["table-timing"] if r[:2] == ["SmallCNN", "Local (all sites)"])
    total = sum(timing[f"local:{s}"]["seconds"] for s in ("site1", "site2", "site3"))
    assert local[2] == f"{total:,.1f}" and local[3] == "4,320"


def test_per_site_table(written_report: tuple[Path, Path, Path]) -> None:
    directory, html_path, _ = written_report
    r = results_of(directory)
    rows = tables_of(html_path.read_text())["table-sites"]
    assert [row[0] for row in rows] == ["site1", "site2", "site3"]
    m = r["TinyCNN"]["local:site2"]["site:site2"]
    assert rows[1][7].startswith(f"{m['auc']:.3f} ")
    assert rows[1][1] == f"{m['n']} ({m['n_pos']})"


def test_formatting_rules() -> None:
    assert (fmt_p(0.0004), fmt_p(0.003), fmt_p(0.21), fmt_p(None)) == (
        "<0.001",
        "0.003",
        "0.210",
        "—",
    )
    assert (p_phrase(0.0004), p_phrase(0.003)) == ("p < 0.001", "p = 0.003")
    assert (fmt_diff(-0.04), fmt_diff(0.012)) == ("−0.040", "+0.012")
    assert verdict(-0.04, 0.003) == "significantly lower"
    assert verdict(0.04, 0.003) == "significantly higher"
    assert verdict(-0.04, 0.05) == "no significant difference"
    assert (fmt_bytes(512), fmt_bytes(1_500_000), fmt_bytes(2.5e9)) == (
        "512 B",
        "1.50 MB",
        "2.50 GB",
    )


def test_roc_points_match_sklearn() -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 2)  # ties
    pts = roc_points(y, s)
    assert pts is not None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(pts[0], fpr)
    np.testing.assert_allclose(pts[1], tpr)
    assert roc_points(np.ones(5), np.arange(5.0)) is None


def test_module_entry_point(
    written_report: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(written_report[0], copy)
    (copy / "report.html").unlink()
    assert main([str(copy)]) == 0
    assert (copy / "report.html").is_file()
    assert str(copy / "report.md") in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "results.json" in capsys.readouterr().err
