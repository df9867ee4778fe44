"""`medfed data check`: every problem in a deliberately broken folder is reported, none raised."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from rich.console import Console

from medfed.data.check import (
    FindingKind,
    Severity,
    check_source,
    from_json,
    render,
    source_from_path,
    to_json,
)
from medfed.data.sources.options import DicomSource, ImageCsvSource, MedMnistSource

FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _png(path: Path, value: int, dtype: type = np.uint8) -> None:
    Image.fromarray((np.arange(12).reshape(3, 4) + value).astype(dtype)).save(path)


def _broken_folder(root: Path) -> Path:
    for i in range(5):
        _png(root / f"{i}.png", 10 * i)
    _png(root / "deep.png", 0, np.uint16)
    shutil.copy(root / "0.png", root / "dup.png")  # exact duplicate
    _png(root / "extra.png", 99)  # on disk, not in the manifest
    blob = (root / "4.png").read_bytes()
    (root / "4.png").write_bytes(blob[:40])  # truncated
    rows = [
        "path,label,patient_id,split",
        "0.png,benign,p0,train",
        "1.png,malignant,p1,train",
        "2.png,benign,p1,val",  # p1 leaks across splits
        "3.png,weird,p3,val",  # unknown label
        "4.png,benign,p4,train",
        "gone.png,benign,p5,train",  # missing file
        "dup.png,benign,p6,train",
        "deep.png,malignant,p7,val",
    ]
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def test_every_problem_is_reported(tmp_path: Path) -> None:
    m = _broken_folder(tmp_path)
    report = check_source(ImageCsvSource(manifest=m, classes=["benign", "malignant"]))
    kinds = {f.kind: f for f in report.findings}
    assert not report.ok
    assert kinds[FindingKind.UNREADABLE].file == str(tmp_path / "4.png")
    assert kinds[FindingKind.UNREADABLE].row == 6
    assert (
        kinds[FindingKind.MISSING_FILE].row == 7
        and "gone.png" in kinds[FindingKind.MISSING_FILE].message
    )
    assert (
        kinds[FindingKind.UNKNOWN_LABEL].row == 5
        and "'weird'" in kinds[FindingKind.UNKNOWN_LABEL].message
    )
    assert (
        "dup.png" in kinds[FindingKind.DUPLICATE].message
        and "0.png" in kinds[FindingKind.DUPLICATE].message
    )
    assert kinds[FindingKind.DUPLICATE].severity == Severity.WARNING  # both in train
    assert "'p1'" in kinds[FindingKind.LEAKAGE].message
    assert kinds[FindingKind.NOT_IN_MANIFEST].file == str(tmp_path / "extra.png")
    assert len(report.findings) == 6
    assert report.n_files == 8 and report.n_readable == 6
    assert report.class_counts == {"benign": 5, "malignant": 2}
    assert report.sizes == {"3x4": 6} and report.channels == {"1": 6}
    assert report.dtypes == {"uint8": 5, "uint16": 1}


def test_json_round_trip_and_render(tmp_path: Path) -> None:
    report = check_source(_broken_folder(tmp_path))  # a path: kind guessed
    blob = json.loads(json.dumps(to_json(report)))
    assert blob == to_json(report) and blob["ok"] is False
    assert from_json(blob) == report
    out = io.StringIO()
    render(report, Console(file=out, width=200))
    assert "patient_leakage" in out.getvalue() and "error" in out.getvalue()


def test_clean_source_is_ok_and_bad_manifest_is_a_finding(tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / f"{i}.png", i)
    (tmp_path / "m.csv").write_text("path,label\n0.png,a\n1.png,b\n")
    assert check_source(tmp_path / "m.csv").ok
    (tmp_path / "bad.csv").write_text("file,label\n0.png,a\n")
    report = check_source(ImageCsvSource(manifest=tmp_path / "bad.csv"))
    assert not report.ok and report.findings[0].kind == FindingKind.BAD_MANIFEST
    assert "column 'path'" in report.findings[0].message


def test_dicom_folder_and_medmnist(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(FILES / "CT_small.dcm", d / "a.dcm")
    shutil.copy(FILES / "MR_truncated.dcm", d / "b.dcm")
    report = check_source(d)
    assert report.kind == "dicom" and report.n_files == 2 and report.n_readable == 1
    assert {f.kind for f in report.errors} == {FindingKind.UNREADABLE}
    assert report.dtypes == {"int16 (16 bits stored)": 1}
    np.savez(tmp_path / "m.npz", train_images=np.zeros((3, 5, 5), np.uint8),
             train_labels=np.array([[0], [1], [1]]))  # fmt: skip
    mm = check_source(MedMnistSource(path=tmp_path / "m.npz", use=["train"]))
    assert mm.class_counts == {"0": 1, "1": 2} and mm.sizes == {"5x5": 3}
    assert any(f.kind == FindingKind.DUPLICATE for f in mm.findings)  # three identical images


def test_source_from_path_guesses(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("path,label\na.dcm,x\n")
    (tmp_path / "i.csv").write_text("path,label\na.png,x\n")
    assert isinstance(source_from_path(tmp_path / "d.csv"), DicomSource)
    assert isinstance(source_from_path(tmp_path / "i.csv"), ImageCsvSource)
    assert isinstance(source_from_path(tmp_path / "x.npz"), MedMnistSource)
    assert isinstance(source_from_path(tmp_path / "i.csv", kind="dicom"), DicomSource)
