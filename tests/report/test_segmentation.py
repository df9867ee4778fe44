"""The report of a segmentation study: Dice in AUC's place, Wilcoxon in DeLong's, overlays in the
ROC curves' section; loading validates the segmentation schema as strictly as classification's."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medfed.report import load_study, write_report
from medfed.report.tables import all_tables
from tests.report.test_report import DATA_URI, PNG_SIGNATURE, md_rows, summary_of, tables_of

Edit = Callable[[Path, Callable[[dict[str, Any]], None]], None]
SegReport = tuple[Path, Path, Path]


def results_of(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "results.json").read_text())


def _cell(m: dict[str, Any], metric: str) -> str:
    lo, hi = m[f"{metric}_ci"]
    if metric == "pixel_acc":
        return f"{100 * m[metric]:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]"
    if metric == "hd95":
        return f"{m[metric]:.1f} [{lo:.1f}–{hi:.1f}]"
    return f"{m[metric]:.3f} [{lo:.3f}–{hi:.3f}]"


def _label(paradigm: str) -> str:
    return f"Local ({paradigm.split(':')[1]})" if ":" in paradigm else paradigm.capitalize()


def _imgs(html_text: str) -> dict[str, bytes]:
    """Embedded images by alt text, decoded."""
    return {
        alt: base64.b64decode(src.removeprefix(DATA_URI), validate=True)
        for src, alt in re.findall(r'<img src="([^"]*)" alt="([^"]*)"', html_text)
    }


def test_study_table_shows_dice_jaccard_and_pixel_accuracy(seg_written_report: SegReport) -> None:
    directory, html_path, _ = seg_written_report
    r = results_of(directory)
    meta = r["meta"]
    tables = tables_of(html_path.read_text())
    rows = tables["table-study"]
    assert [(row[0], row[1]) for row in rows] == [
        (net, _label(p)) for net in meta["networks"] for p in meta["paradigms"]
    ]
    for row in rows:
        net = row[0]
        p = next(p for p in meta["paradigms"] if _label(p) == row[1])
        for col, split in ((2, "internal"), (5, "external")):
            m = r[net][p][split]
            assert row[col : col + 3] == [_cell(m, k) for k in ("dice", "jaccard", "pixel_acc")]
    html_text = html_path.read_text()
    assert "Internal validation · n = 30 images" in html_text
    assert "External validation (site7) · n = 10 images" in html_text
    assert "Dice [95% CI]" in html_text and "malignant" not in html_text
    # Per-image Dice in Table 2; no HD95 column when the study did not compute it.
    per_image = tables["table-per_image"]
    m = r["UNet"]["federated"]["internal"]
    assert per_image[1][:3] == ["UNet", "Federated", _cell(m, "mean_image_dice")]
    assert len(per_image[1]) == 2 + 2 and "HD95" not in html_text


def test_per_site_table_shows_dice(seg_written_report: SegReport) -> None:
    directory, html_path, _ = seg_written_report
    r = results_of(directory)
    rows = tables_of(html_path.read_text())["table-sites"]
    assert [row[0] for row in rows] == ["site1", "site2", "site3"]
    m = r["TinyUNet"]["local:site2"]["site:site2"]
    assert rows[1][1] == str(m["n"])
    assert rows[1][7] == _cell(m, "dice")
    assert rows[0][3] == _cell(r["UNet"]["federated"]["site:site1"], "dice")


def test_comparisons_are_wilcoxon_on_per_image_dice(seg_written_report: SegReport) -> None:
    directory, html_path, _ = seg_written_report
    html_text = html_path.read_text()
    assert "Wilcoxon signed-rank tests on per-image Dice" in html_text
    assert "DeLong" not in html_text
    rows = tables_of(html_text)["table-comparisons"]
    comparisons = results_of(directory)["comparisons"]
    assert len(rows) == len(comparisons)
    c = next(
        c
        for c in comparisons
        if (c["network"], c["split"], c["b"]) == ("UNet", "external", "local:site2")
    )
    p = "<0.001" if c["p_value"] < 0.001 else f"{c['p_value']:.3f}"
    sign = "−" if c["difference"] < 0 else "+"
    assert [
        "UNet",
        "External validation",
        "Federated vs Local (site2)",
        str(c["n"]),
        f"{c['mean_a']:.3f}",
        f"{c['mean_b']:.3f}",
        f"{sign}{abs(c['difference']):.3f}",
        p,
        "significantly higher" if c["p_value"] < 0.05 else "no significant difference",
    ] in rows


def test_overlays_are_embedded_and_there_is_no_roc(seg_written_report: SegReport) -> None:
    directory, html_path, _ = seg_written_report
    html_text = html_path.read_text()
    images = _imgs(html_text)
    for net, rel in results_of(directory)["meta"]["overlays"].items():
        assert images[f"Example segmentations by {net}"] == (directory / rel).read_bytes()
        assert images[f"Learning curves for {net}"].startswith(PNG_SIGNATURE)
        assert images[f"Per-site Dice for {net}"].startswith(PNG_SIGNATURE)
    assert len(images) == html_text.count("<img") == 3 * 2
    assert 'id="overlays"' in html_text and "Example segmentations</h2>" in html_text
    assert 'id="roc"' not in html_text and "ROC" not in html_text
    assert "validation Dice and mean training loss" in html_text
    # Still self-contained: the overlay travels inside the file, not as a link to it.
    assert "overlays/" not in html_text and 'src="' + DATA_URI in html_text
    assert all(src.startswith(DATA_URI) for src in re.findall(r'src="([^"]*)"', html_text))


def test_what_this_means_speaks_dice_and_wilcoxon(seg_study_factory: Any, edit: Edit) -> None:
    directory = seg_study_factory()

    def cases(r: dict[str, Any]) -> None:
        for c in r["comparisons"]:
            if c["b"] == "centralized" and c["network"] == "UNet":
                c["difference"], c["p_value"] = (
                    (-0.04, 0.003) if c["split"] == "internal" else (0.01, 0.21)
                )

    edit(directory, cases)
    html_path, md_path = write_report(directory)
    text = summary_of(html_path.read_text())
    r = results_of(directory)
    fed, cen = r["UNet"]["federated"]["internal"], r["UNet"]["centralized"]["internal"]
    assert (
        f"Federated Dice {_cell(fed, 'dice')} vs centralized {_cell(cen, 'dice')} on internal "
        "validation (difference in mean per-image Dice −0.040): significantly lower (p = 0.003)."
    ) in text
    assert (
        "(difference in mean per-image Dice +0.010): no significant difference (p = 0.210)" in text
    )
    assert (
        "outside 0.03 Dice of centralized on internal validation, but within it on the external"
        in text
    )
    assert "higher Dice than that site's local model" in text
    assert "AUC" not in text
    md = md_path.read_text()
    assert "Wilcoxon signed-rank test" in md and "Decision threshold" not in md
    assert "significantly lower (p = 0.003)" in md


def test_markdown_has_the_same_tables_and_links_the_overlays(seg_written_report: SegReport) -> None:
    directory, html_path, md_path = seg_written_report
    html_tables, md_text = tables_of(html_path.read_text()), md_path.read_text()
    titles = {
        "table-study": "Table 1",
        "table-per_image": "Table 2",
        "table-sites": "Table 3",
        "table-communication": "Table 4",
        "table-timing": "Table 5",
        "table-comparisons": "Table 6",
    }
    assert set(html_tables) == set(titles)
    for key, title in titles.items():
        assert md_rows(md_text, title) == html_tables[key], key
    for net, rel in results_of(directory)["meta"]["overlays"].items():
        assert f"![Example segmentations by {net}]({rel})" in md_text
        assert (md_path.parent / rel).is_file()  # the link resolves from report.md's folder
    assert "## Example segmentations" in md_text and DATA_URI not in md_text
    assert "ROC" not in md_text and "per-site Dice" in md_text


def test_missing_overlay_gives_a_placeholder_naming_it(seg_study_factory: Any, edit: Edit) -> None:
    directory = seg_study_factory()
    (directory / "overlays" / "unet.png").unlink()
    (directory / "overlays" / "tinyunet.png").write_text("not an image")
    html_path, md_path = write_report(directory)
    html_text, md_text = html_path.read_text(), md_path.read_text()
    assert html_text.count('<div class="placeholder">') == 2
    assert "UNet: overlay image not found: overlays/unet.png" in html_text
    assert "TinyUNet: overlay image is not a PNG file: overlays/tinyunet.png" in html_text
    assert html_text.count("<img") == 3 * 2 - 2
    assert "overlay image not found: overlays/unet.png" in md_text.replace("\\", "")
    assert "![" not in md_text

    edit(directory, lambda r: r["meta"]["overlays"].clear())
    html_text = write_report(directory)[0].read_text()
    assert "UNet: no overlay image recorded in results.json" in html_text


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r["meta"].pop("metrics"), "meta.metrics"),
        (lambda r: r["meta"].update(task="detection"), "meta.task"),
        (
            lambda r: r["UNet"]["federated"]["internal"].pop("dice_ci"),
            "UNet.federated.internal.dice_ci",
        ),
        (
            lambda r: r["TinyUNet"]["local:site1"]["site:site3"].pop("n_pixels"),
            "TinyUNet.local:site1.site:site3.n_pixels",
        ),
        (
            lambda r: r["UNet"]["centralized"]["external"].update(jaccard="0.5"),
            "UNet.centralized.external.jaccard",
        ),
        (
            lambda r: r["UNet"]["centralized"]["internal"].pop("mean_image_dice"),
            "UNet.centralized.internal.mean_image_dice",
        ),
        (lambda r: r["comparisons"][2].pop("mean_b"), "comparisons[2].mean_b"),
        (lambda r: r["comparisons"][0].pop("statistic"), "comparisons[0].statistic"),
        (lambda r: r["comparisons"][1].pop("test"), "comparisons[1].test"),
        (lambda r: r["meta"].update(overlays=["x.png"]), "meta.overlays"),
        (lambda r: r["meta"]["overlays"].update(UNet="../../x.png"), "meta.overlays.UNet"),
    ],
)
def test_malformed_segmentation_results_name_the_field(
    seg_study_factory: Any, edit: Edit, change: Callable[[dict[str, Any]], Any], field: str
) -> None:
    directory = seg_study_factory()
    edit(directory, change)
    with pytest.raises(ValueError, match=re.escape("results.json")) as err:
        write_report(directory)
    assert f"'{field}'" in str(err.value)
    assert not (directory / "report.html").exists()


def test_needs_neither_predictions_nor_segmentation_csv(seg_study_factory: Any) -> None:
    directory = seg_study_factory()
    (directory / "segmentation.csv").unlink()
    assert not (directory / "predictions.csv").exists()
    study = load_study(directory)
    assert study.segmentation and study.headline == "dice" and study.predictions == {}
    assert study.meta.threshold_rule is None
    assert write_report(directory)[0].is_file()


def test_hd95_column_when_the_study_computed_it(seg_study_factory: Any) -> None:
    directory = seg_study_factory(hd95=True)
    html_path, md_path = write_report(directory)
    html_text = html_path.read_text()
    row = tables_of(html_text)["table-per_image"][0]
    m = results_of(directory)["UNet"]["centralized"]
    assert row[2:] == [
        _cell(m["internal"], "mean_image_dice"),
        _cell(m["internal"], "hd95"),
        _cell(m["external"], "mean_image_dice"),
        _cell(m["external"], "hd95"),
    ]
    assert "HD95 (px) [95% CI]" in html_text and "lower is better" in md_path.read_text()


def test_segmentation_without_external_site(seg_study_factory: Any) -> None:
    directory = seg_study_factory(external=False)
    html_path, md_path = write_report(directory)
    html_text = html_path.read_text()
    assert "External validation" not in html_text
    assert "external site" not in summary_of(html_text)
    assert len(tables_of(html_text)["table-study"][0]) == 2 + 3
    assert "External Dice" not in md_path.read_text()


def test_explicit_classification_task_reads_like_a_file_without_one(
    study_factory: Any, edit: Edit
) -> None:
    directory = study_factory()
    before = write_report(directory)[0].read_text()
    edit(directory, lambda r: r["meta"].update(task="classification"))
    assert write_report(directory)[0].read_text() == before
    study = load_study(directory)
    assert not study.segmentation and study.headline == "auc" and study.overlays == {}
    assert list(all_tables(study))[:2] == ["study", "predictive"]
    edit(directory, lambda r: r["meta"].pop("threshold_rule"))
    with pytest.raises(ValueError, match="meta.threshold_rule"):
        load_study(directory)
