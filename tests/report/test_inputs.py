"""Reading a study directory: what is required fails loudly and by name, what may be missing
(a paradigm left out of the config, a split with no cases, a history) still gives a report."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medfed.report import load_study, write_report
from medfed.report.rounds import read_history
from medfed.report.tables import all_tables
from medfed.report.text import narrative

Edit = Callable[[Path, Callable[[dict[str, Any]], None]], None]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "results.json").unlink(), "results.json"),
        (lambda d: (d / "predictions.csv").unlink(), "predictions.csv"),
        (lambda d: (d / "results.json").write_text("{"), "results.json"),
    ],
)
def test_missing_file_raises_naming_it(
    study_factory: Any, breakage: Callable[[Path], Any], message: str
) -> None:
    directory = study_factory()
    breakage(directory)
    with pytest.raises(ValueError, match=message):
        write_report(directory)
    assert not (directory / "report.html").exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r["meta"].pop("sites"), "meta.sites"),
        (
            lambda r: r["SmallCNN"]["federated"]["internal"].pop("auc_ci"),
            "SmallCNN.federated.internal.auc_ci",
        ),
        (lambda r: r["TinyCNN"].pop("local:site2"), "TinyCNN.local:site2"),
        (lambda r: r["comparisons"][0].pop("p_value"), "comparisons[0].p_value"),
        (lambda r: r["timing"]["SmallCNN"].pop("federated"), "timing.SmallCNN.federated"),
        (
            lambda r: r["meta"]["histories"]["SmallCNN"].update(federated="../../etc/x"),
            "meta.histories.SmallCNN.federated",
        ),
    ],
)
def test_missing_field_raises_naming_file_and_field(
    study_factory: Any, edit: Edit, change: Callable[[dict[str, Any]], Any], field: str
) -> None:
    directory = study_factory()
    edit(directory, change)
    with pytest.raises(ValueError, match=re.escape("results.json")) as err:
        write_report(directory)
    assert field in str(err.value)


def test_predictions_missing_column_names_it(study_factory: Any) -> None:
    directory = study_factory()
    path = directory / "predictions.csv"
    path.write_text(path.read_text().replace(",score", ",prob", 1))
    with pytest.raises(ValueError, match="predictions.csv.*score"):
        write_report(directory)


def _drop_paradigms(results: dict[str, Any], keep: Callable[[str], bool]) -> None:
    """What ``medfed study`` writes when the config lists fewer paradigms."""
    meta = results["meta"]
    gone = [p for p in meta["paradigms"] if not keep(p)]
    meta["paradigms"] = [p for p in meta["paradigms"] if keep(p)]
    for net in meta["networks"]:
        for p in gone:
            del results[net][p], results["timing"][net][p], meta["histories"][net][p]
    results["comparisons"] = [c for c in results["comparisons"] if keep(c["a"]) and keep(c["b"])]
    if "federated" in gone:
        meta["communication"] = {}


def test_study_without_local_models(study_factory: Any, edit: Edit) -> None:
    directory = study_factory()
    edit(directory, lambda r: _drop_paradigms(r, lambda p: not p.startswith("local:")))
    write_report(directory)
    study = load_study(directory)
    tables = all_tables(study)
    assert [r.cells[1].text for r in tables["study"].rows] == ["Centralized", "Federated"] * 2
    assert all(c.text == "—" for r in tables["sites"].rows for c in r.cells[4::3])
    text = " ".join(t for _, t in narrative(study))
    assert "local" not in text and "significant" in text


def test_study_without_federated_model(study_factory: Any, edit: Edit) -> None:
    directory = study_factory()
    edit(directory, lambda r: _drop_paradigms(r, lambda p: p != "federated"))
    html_path, _ = write_report(directory)
    study = load_study(directory)
    assert all("no federated model" in t for _, t in narrative(study))
    assert all_tables(study)["communication"].rows == ()
    assert "No federated run in this study" in html_path.read_text()


def test_split_without_cases_reads_as_undefined(study_factory: Any, edit: Edit) -> None:
    """The study writer leaves out a split with no cases, e.g. a site without validation data."""
    directory = study_factory()

    def no_site2(r: dict[str, Any]) -> None:
        for by_split in r["TinyCNN"].values():
            del by_split["site:site2"]

    edit(directory, no_site2)
    write_report(directory)
    row = all_tables(load_study(directory))["sites"].rows[1]
    assert [c.text for c in row.cells[5:]] == ["—", "—", "—"]
    assert row.cells[2].text != "—"  # SmallCNN still has its site2 results


def test_history_reader_accepts_old_new_and_segmentation_rows(tmp_path: Path) -> None:
    old = {
        "round": 0,
        "sites": {
            "a": {"train_loss": 0.5, "examples": 30},
            "b": {"train_loss": 0.8, "examples": 10},
        },
        "val_auc": 0.61,
        "val_acc": 0.55,
        "external_auc": None,
    }
    new = {
        "round": 1,
        "val": {"auc": 0.72, "acc": 0.66},
        "external": {"auc": 0.69, "acc": 0.6},
        "val_auc": 0.72,
        "val_acc": 0.66,
        "external_auc": 0.69,
    }
    seg = {
        "round": 2,
        "val": {"dice": 0.81, "jaccard": 0.68, "pixel_acc": 0.97, "mean_image_dice": 0.79},
        "external": None,
        "site_val": {"a": {"dice": 0.8, "jaccard": 0.67, "pixel_acc": 0.97, "n": 5}},
        "val_auc": None,
        "external_auc": None,
    }
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (old, new, seg)) + '{"round": 3, "va')
    points = read_history(path)
    assert points is not None and [p.round for p in points] == [0, 1, 2]
    first, second, third = points
    assert first.val == {"auc": 0.61, "acc": 0.55} and first.external == {}
    assert first.train_loss == pytest.approx((0.5 * 30 + 0.8 * 10) / 40)
    assert (first.val_auc, first.external_auc) == (0.61, None)
    assert second.score("val", "auc") == 0.72 and second.score("external", "acc") == 0.6
    assert third.score("val", "dice") == 0.81 and third.score("external", "dice") is None
    assert third.val_auc is None and third.train_loss is None
    assert read_history(tmp_path / "absent.jsonl") is None


def test_new_history_rows_draw_the_same_learning_curves(study_factory: Any) -> None:
    """A classification history with ``val``/``external`` dicts reads exactly like the old one."""
    directory = study_factory()
    before = write_report(directory)[0].read_text()
    for path in (directory / "runs").rglob("history.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["val"] = {"auc": row.pop("val_auc"), "acc": row.pop("val_acc")}
            ext = row.pop("external_auc"), row.pop("external_acc")
            row["external"] = None if ext[0] is None else {"auc": ext[0], "acc": ext[1]}
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_report(directory)[0].read_text() == before
