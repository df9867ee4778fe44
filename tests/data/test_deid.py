"""De-identification on real DICOM files shipped inside the installed pydicom package.

The files are copied out of pydicom's own ``data/test_files`` folder (never fetched: the
``get_testdata_file`` helpers try to download), so the tests see real vendor headers, private
groups, nested sequences, RLE/JPEG/big-endian encodings and RT cross-references.
"""

from __future__ import annotations

import csv
import shutil
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from medfed.data.deid import (
    AUDIT_COLUMNS,
    AuditAction,
    DeidError,
    DeidOptions,
    DeidReport,
    deidentify_dataset,
    deidentify_tree,
    parse_mask_rect,
    pseudonymize_uid,
)
from medfed.data.deid_profile import BASIC_PROFILE, REPEATING_GROUP_ROWS, ProfileAction

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SECRET = b"site-A-secret-0123456789abcdef"
OTHER_SECRET = b"site-B-secret-0123456789abcdef"

# name -> why it is in the selection
SELECTION = {
    "CT_small.dcm": "vendor private groups, many identifying attributes",
    "MR_small.dcm": "same patient/study/series as the RLE and implicit copies below",
    "MR_small_RLE.dcm": "compressed copy of MR_small",
    "MR_small_implicit.dcm": "implicit VR copy of MR_small",
    "rtplan.dcm": "nested sequences with referenced UIDs",
    "rtdose_1frame.dcm": "references the RT plan and structure set by UID",
    "SC_rgb_rle.dcm": "secondary capture: may carry burned-in text",
    "ExplVR_BigEnd.dcm": "ultrasound, big endian",
    "nested_priv_SQ.dcm": "private sequences nested in private sequences",
    "test-SR.dcm": "structured report with content and observer sequences",
}
PROFILE_TAGS = {row.tag for row in BASIC_PROFILE if row.action is not ProfileAction.K}


def _profile_listed(tag: int) -> bool:
    return tag in PROFILE_TAGS or any(tag & r.mask == r.tag for r in REPEATING_GROUP_ROWS)


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about odd values in its own test files
        return pydicom.dcmread(path)


def _elements(ds: Dataset) -> Iterator[pydicom.DataElement]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield from ds.iterall()


def _values(value: object) -> list[str]:
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return [str(v) for v in value if str(v)]
    if value is None or isinstance(value, (bytes, pydicom.Sequence)):
        return []
    return [str(value)] if str(value) else []


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("in")
    for i, name in enumerate(SELECTION):
        sub = root / ("site" if i % 2 else "site/nested")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(PYDICOM_FILES / name, sub / name)
    (root / "README.txt").write_text("not a DICOM file\n")
    data = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    (root / "site" / "truncated.dcm").write_bytes(data[: len(data) // 2])
    return root


def _inputs(src: Path) -> dict[str, Path]:
    return {p.name: p for p in src.rglob("*.dcm") if p.name in SELECTION}


def _run(src: Path, dst: Path, **kw: object) -> DeidReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return deidentify_tree(src, dst, options=DeidOptions(site_secret=SECRET, **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def plain(src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeidReport]:
    dst = tmp_path_factory.mktemp("out_plain")
    return dst, _run(src, dst)


@pytest.fixture(scope="module")
def shifted(src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeidReport]:
    dst = tmp_path_factory.mktemp("out_shift")
    return dst, _run(src, dst, shift_dates=True)


def _pairs(src: Path, dst: Path) -> Iterator[tuple[Dataset, Dataset]]:
    for _name, path in sorted(_inputs(src).items()):
        yield _read(path), _read(dst / path.relative_to(src))


def test_report_counts_skips_and_failures(src: Path, plain: tuple[Path, DeidReport]) -> None:
    dst, report = plain
    assert report.processed == len(SELECTION)
    assert report.skipped == [("README.txt", "not a DICOM file (no DICM preamble)")]
    assert [f for f, _ in report.failed] == ["site/truncated.dcm"]
    assert "truncated" in report.failed[0][1]
    assert not (dst / "site" / "truncated.dcm").exists()
    assert not (dst / "README.txt").exists()
    for path in _inputs(src).values():  # relative layout mirrored
        assert (dst / path.relative_to(src)).is_file()


def test_profile_attributes_do_not_survive(src: Path, plain: tuple[Path, DeidReport]) -> None:
    dst, _ = plain
    checked = 0
    for before, after in _pairs(src, dst):
        original = {
            (int(e.tag), v)
            for e in _elements(before)
            if _profile_listed(int(e.tag))
            for v in _values(e.value)
        }
        original |= {
            (0x00020003, v) for v in _values(before.file_meta.get("MediaStorageSOPInstanceUID"))
        }
        survived = {(int(e.tag), v) for e in _elements(after) for v in _values(e.value)} | {
            (0x00020003, str(after.file_meta.MediaStorageSOPInstanceUID))
        }
        assert not (original & survived), sorted(original & survived)[:5]
        checked += len(original)
    assert checked > 100  # the selection really exercises the table


def test_no_private_tags_remain(src: Path, plain: tuple[Path, DeidReport]) -> None:
    dst, _ = plain
    had_private = False
    for before, after in _pairs(src, dst):
        had_private |= any(e.tag.is_private for e in _elements(before))
        assert not any(e.tag.is_private for e in _elements(after))
    assert had_private


def test_markers_set(src: Path, shifted: tuple[Path, DeidReport]) -> None:
    dst, _ = shifted
    for _, after in _pairs(src, dst):
        assert after.PatientIdentityRemoved == "YES"
        assert "Basic Profile" in after.DeidentificationMethod[0]
        codes = [c.CodeValue for c in after.DeidentificationMethodCodeSequence]
        assert codes == ["113100", "113107"]
        assert after.LongitudinalTemporalInformationModified == "MODIFIED"


def test_pixels_untouched_and_decodable(src: Path, plain: tuple[Path, DeidReport]) -> None:
    dst, _ = plain
    compared = 0
    for before, after in _pairs(src, dst):
        assert before.file_meta.TransferSyntaxUID == after.file_meta.TransferSyntaxUID
        if "PixelData" not in before:
            continue
        assert after.PixelData == before.PixelData
        compared += 1
        try:
            expected = before.pixel_array
        except Exception:
            continue
        np.testing.assert_array_equal(after.pixel_array, expected)
    assert compared >= 6


def test_uids_consistent_valid_and_secret_dependent(
    src: Path, plain: tuple[Path, DeidReport], tmp_path: Path
) -> None:
    dst, _ = plain
    inputs = _inputs(src)
    out = {name: _read(dst / p.relative_to(src)) for name, p in inputs.items()}
    orig = {name: _read(p) for name, p in inputs.items()}

    # MR_small and its re-encoded copies share study, series and instance UIDs in the input.
    mrs = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm"]
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert len({str(orig[m].get(kw)) for m in mrs}) == 1
        assert len({str(out[m].get(kw)) for m in mrs}) == 1
        assert out["MR_small.dcm"].get(kw) != orig["MR_small.dcm"].get(kw)
    for ds in out.values():
        if "SOPInstanceUID" in ds:
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    # References inside sequences map with the same function as the referenced instance's UID,
    # so a link to an instance de-identified in another run of this site still resolves.
    plan_ref = orig["rtdose_1frame.dcm"].ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
    new_ref = out["rtdose_1frame.dcm"].ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
    assert new_ref == pseudonymize_uid(plan_ref, secret=SECRET) != plan_ref
    assert out["rtplan.dcm"].SOPInstanceUID == pseudonymize_uid(
        orig["rtplan.dcm"].SOPInstanceUID, secret=SECRET
    )

    for ds in out.values():
        for e in _elements(ds):
            if e.VR == "UI" and e.keyword.endswith("InstanceUID"):
                for v in _values(e.value):
                    assert len(v) <= 64 and UID(v).is_valid, (e.keyword, v)
                    assert v.startswith("2.25.")

    other = tmp_path / "other"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deidentify_tree(
            inputs["MR_small.dcm"], other, options=DeidOptions(site_secret=OTHER_SECRET)
        )
    assert _read(other / "MR_small.dcm").StudyInstanceUID != out["MR_small.dcm"].StudyInstanceUID


def _dates(ds: Dataset) -> dict[str, datetime]:
    found = {}
    for e in _elements(ds):
        if e.VR in ("DA", "DT") and e.keyword != "PatientBirthDate":
            for v in _values(e.value):
                if len(v) >= 8 and v[:8].isdigit():
                    found[f"{e.tag}:{v}"] = datetime.strptime(v[:8], "%Y%m%d")
    return found


def test_date_shift_preserves_intervals_per_patient(
    src: Path, shifted: tuple[Path, DeidReport]
) -> None:
    dst, _ = shifted
    offsets_by_patient: dict[str, set[int]] = {}
    for before, after in _pairs(src, dst):
        b = {k.split(":")[0]: d for k, d in _dates(before).items()}
        a = {k.split(":")[0]: d for k, d in _dates(after).items()}
        if not b:
            continue
        # Dates inside emptied sequences (SR Content/Verifying Observer: D on SQ) disappear.
        assert a.keys() <= b.keys() and a
        offsets = {(a[t] - b[t]).days for t in a}
        offsets_by_patient.setdefault(str(before.PatientID), set()).update(offsets)
        assert after.PatientID != before.PatientID
    assert len(offsets_by_patient["4MR1"]) == 1  # one offset across the patient's three files
    for offsets in offsets_by_patient.values():
        assert len(offsets) == 1
        assert -365 <= next(iter(offsets)) <= -1


def test_dates_removed_or_dummied_without_shift(src: Path, plain: tuple[Path, DeidReport]) -> None:
    dst, _ = plain
    before, after = next((b, a) for b, a in _pairs(src, dst) if b.get("StudyDate"))
    assert after.StudyDate == ""  # Z in the Basic Profile
    assert after.LongitudinalTemporalInformationModified == "REMOVED"


def test_patient_pseudonyms_link_studies(src: Path, plain: tuple[Path, DeidReport]) -> None:
    dst, _ = plain
    ids: dict[str, set[str]] = {}
    for before, after in _pairs(src, dst):
        if before.get("PatientID"):
            ids.setdefault(str(before.PatientID), set()).add(str(after.PatientID))
            assert str(before.PatientName) not in str(after.PatientName) or not before.PatientName
    assert all(len(v) == 1 for v in ids.values())
    assert len({next(iter(v)) for v in ids.values()}) == len(ids)


def test_audit_has_rows_and_no_phi(src: Path, plain: tuple[Path, DeidReport]) -> None:
    dst, report = plain
    assert report.audit_path == dst / "deid_audit.csv"
    with report.audit_path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == AUDIT_COLUMNS
    assert len(rows) > 100
    actions = {r[4] for r in rows[1:]}
    assert {"remove", "replace_uid", "pseudonym", "remove_private", "skipped", "failed"} <= actions
    text = report.audit_path.read_text()
    phi = set()
    for before, _ in _pairs(src, dst):
        for kw in ("PatientName", "PatientID"):
            value = str(before.get(kw, "") or "")
            if len(value) >= 3:
                phi.add(value)
    assert phi
    for value in phi:
        assert value not in text


def test_burned_in_flagged(plain: tuple[Path, DeidReport]) -> None:
    _, report = plain
    flagged = {Path(p).name for p in report.burned_in}
    assert {"SC_rgb_rle.dcm", "ExplVR_BigEnd.dcm"} <= flagged
    assert "CT_small.dcm" not in flagged and "MR_small.dcm" not in flagged


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "MR_small.dcm"])
def test_mask_blacks_out_region_only(name: str, tmp_path: Path) -> None:
    shutil.copy(PYDICOM_FILES / name, tmp_path / name)
    before = _read(tmp_path / name)
    rect = (2, 3, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = deidentify_tree(
            tmp_path / name,
            tmp_path / "out",
            options=DeidOptions(site_secret=SECRET, mask_rect=rect),
        )
    assert report.processed == 1
    after = _read(tmp_path / "out" / name)
    assert after.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert after.BurnedInAnnotation == "NO"
    a, b = after.pixel_array, before.pixel_array
    region = (slice(2, 7), slice(3, 7))
    assert (a[region] == 0).all()
    assert (b[region] != 0).any()
    a2, b2 = a.copy(), b.copy()
    a2[region] = 0
    b2[region] = 0
    np.testing.assert_array_equal(a2, b2)


def test_refusals(src: Path, tmp_path: Path) -> None:
    opts = DeidOptions(site_secret=SECRET)
    with pytest.raises(DeidError, match="inside"):
        deidentify_tree(src, src, options=opts)
    with pytest.raises(DeidError, match="inside"):
        deidentify_tree(src, src / "site" / "out", options=opts)
    with pytest.raises(DeidError, match="secret"):
        deidentify_tree(src, tmp_path / "o", options=DeidOptions(site_secret=b""))
    one = src / "site" / "MR_small.dcm"
    with pytest.raises(DeidError, match="overwrite"):  # output would be the input file itself
        deidentify_tree(one, one.parent, options=opts)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "MR_small.dcm").write_bytes(b"someone else's file")
    with pytest.raises(DeidError, match="overwrite"):
        deidentify_tree(one, out, options=opts)
    assert (out / "MR_small.dcm").read_bytes() == b"someone else's file"
    assert not (out / "deid_audit.csv").exists()  # refused before writing anything


def test_deidentify_dataset_in_memory_sequences() -> None:
    ds = _read(PYDICOM_FILES / "rtplan.dcm")
    before_refs = [str(e.value) for e in _elements(ds) if e.keyword == "ReferencedSOPInstanceUID"]
    rows = deidentify_dataset(ds, options=DeidOptions(site_secret=SECRET))
    after_refs = [str(e.value) for e in _elements(ds) if e.keyword == "ReferencedSOPInstanceUID"]
    assert before_refs and after_refs == [pseudonymize_uid(u, secret=SECRET) for u in before_refs]
    assert any("[0]." in r.tag for r in rows)  # changes inside sequences are audited by path
    assert all(r.action in AuditAction for r in rows)


def test_parse_mask_rect() -> None:
    assert parse_mask_rect("40") == (0, 0, 40, 65535)
    assert parse_mask_rect("1,2,3,4") == (1, 2, 3, 4)
    for bad in ("", "a", "1,2,3", "1,2,0,4", "-1,0,2,2"):
        with pytest.raises(DeidError):
            parse_mask_rect(bad)
