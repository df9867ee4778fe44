"""DICOM source on pydicom's bundled test files (never the downloadable ones)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medfed.data.sources.dicom import decode_dicom, load_dicom
from medfed.data.sources.errors import DataError
from medfed.data.sources.options import DicomSource, ImageOptions

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
RAW = ImageOptions(size=64, resize="stretch", intensity="minmax")


def _one(path: Path, opts: ImageOptions = RAW, **kw: Any) -> np.ndarray:
    dec = decode_dicom(path, **kw)
    from medfed.data.sources.image import convert_images

    return convert_images(
        dec.frames, opts, source=str(path), display_range=dec.display_range
    ).numpy()


def test_rescale_applied_hu_window(tmp_path: Path) -> None:
    ds = pydicom.dcmread(FILES / "CT_small.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024  # make the rescale matter
    ds.save_as(tmp_path / "ct.dcm")
    hu = apply_modality_lut(ds.pixel_array, ds).astype(float)  # independent reference
    opts = ImageOptions(size=128, resize="stretch", intensity="window", window=(40, 400))
    got = _one(tmp_path / "ct.dcm", opts)[0, 0]
    expected = np.rint(np.clip((hu - (40 - 200)) / 400 * 255, 0, 255))
    np.testing.assert_array_equal(got, expected)
    raw_window = np.rint(np.clip((ds.pixel_array - (40 - 200)) / 400 * 255, 0, 255))
    assert not np.array_equal(got, raw_window)  # the stored values would give another image


def test_voi_window_matches_the_standard_formula() -> None:
    ds = pydicom.dcmread(FILES / "MR_small.dcm")
    x = ds.pixel_array.astype(float)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    # DICOM PS3.3 C.11.2.1.2.1, mapped onto [0, 1]
    expected = np.rint(np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255)
    got = _one(FILES / "MR_small.dcm")[0, 0]
    assert np.abs(got - expected).max() <= 1
    off = _one(FILES / "MR_small.dcm", voi=False)[0, 0]
    assert np.abs(off - np.rint((x - x.min()) / (x.max() - x.min()) * 255)).max() == 0


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(FILES / "CT_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    m2 = _one(FILES / "CT_small.dcm", ImageOptions(size=128, resize="stretch")).astype(int)
    m1 = _one(tmp_path / "m1.dcm", ImageOptions(size=128, resize="stretch")).astype(int)
    assert np.abs(m1 - (255 - m2)).max() <= 1 and m2.std() > 10


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])  # fmt: skip
def test_lossless_transfer_syntaxes_decode_identically(name: str) -> None:
    np.testing.assert_array_equal(_one(FILES / name), _one(FILES / "MR_small.dcm"))


@pytest.mark.parametrize("name", ["SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_gdcm_KY.dcm"])  # fmt: skip
def test_ybr_and_jpeg_colour_become_rgb(name: str) -> None:
    opts = ImageOptions(size=100, resize="stretch", channels=3, intensity="none")
    ref = _one(FILES / "SC_rgb_rle.dcm", opts).astype(int)
    got = _one(FILES / name, opts).astype(int)
    assert got.shape == (1, 3, 100, 100)
    assert np.abs(got - ref).mean() < 4  # lossy JPEG / chroma subsampling, but RGB, not YBR
    assert ref[0, 0, 5, 5] > 200 and ref[0, 1, 5, 5] < 10  # the top-left bar is red


def test_multiframe_all_frames_one_patient(tmp_path: Path) -> None:
    spec_rows = "sop_instance_uid,label\n" + ",".join(
        [str(pydicom.dcmread(FILES / "rtdose.dcm").SOPInstanceUID), "dose"]) + "\n"  # fmt: skip
    (tmp_path / "labels.csv").write_text(spec_rows)
    opts = ImageOptions(size=10, resize="stretch", intensity="none")
    spec = DicomSource(path=FILES / "rtdose.dcm", labels_csv=tmp_path / "labels.csv", frame="all")
    data = load_dicom(spec, image=opts)
    uid = str(pydicom.dcmread(FILES / "rtdose.dcm").SOPInstanceUID)
    assert len(data) == 15 and data.case_ids[3] == f"{uid}#3"
    assert set(data.patient_ids) == {"id11111"}
    third = load_dicom(spec.model_copy(update={"frame": 3}), image=opts)
    np.testing.assert_array_equal(third.images[0].numpy(), data.images[3].numpy())
    with pytest.raises(DataError, match="frame 20 requested but the file has 15"):
        load_dicom(spec.model_copy(update={"frame": 20}), image=opts)


def test_folder_with_labels_by_uid_and_by_path(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    shutil.copy(FILES / "CT_small.dcm", tmp_path / "d" / "ct.dcm")
    shutil.copy(FILES / "MR_small.dcm", tmp_path / "d" / "sub" / "mr")  # no extension
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    ct = str(pydicom.dcmread(FILES / "CT_small.dcm").SOPInstanceUID)
    mr = str(pydicom.dcmread(FILES / "MR_small.dcm").SOPInstanceUID)
    (tmp_path / "uid.csv").write_text(f"sop_instance_uid,label\n{ct},ct\n{mr},mr\n")
    data = load_dicom(DicomSource(path=tmp_path / "d", labels_csv=tmp_path / "uid.csv"),
                      image=ImageOptions(size=32))  # fmt: skip
    assert sorted(zip(data.case_ids, data.labels.tolist(), strict=False)) == sorted(
        [(ct, 0), (mr, 1)]
    )
    assert set(data.patient_ids) == {"1CT1", "4MR1"}
    (tmp_path / "path.csv").write_text("path,label\nd/ct.dcm,ct\n")
    spec = DicomSource(path=tmp_path / "d", labels_csv=tmp_path / "path.csv", key="path")
    with pytest.raises(DataError, match=r"sub/mr: no label for this file"):
        load_dicom(spec, image=ImageOptions(size=32))


def test_manifest_csv_and_missing_decoder(tmp_path: Path) -> None:
    for n in ("MR_small.dcm", "JPEGLSNearLossless_08.dcm"):
        shutil.copy(FILES / n, tmp_path / n)
    (tmp_path / "m.csv").write_text("path,label\nMR_small.dcm,a\nJPEGLSNearLossless_08.dcm,b\n")
    with pytest.raises(DataError) as err:
        load_dicom(DicomSource(path=tmp_path / "m.csv"), image=ImageOptions(size=32))
    msg = str(err.value)
    assert "row 3" in msg and "JPEGLSNearLossless_08.dcm" in msg
    assert "JPEG-LS Lossy" in msg and "1.2.840.10008.1.2.4.81" in msg and "pylibjpeg" in msg
    data = load_dicom(DicomSource(path=tmp_path / "m.csv", on_error="skip"),
                      image=ImageOptions(size=32))  # fmt: skip
    assert len(data) == 1 and len(data.skipped) == 1


def test_truncated_and_non_dicom_files(tmp_path: Path, write_csv: Any) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 200)
    for bad in (FILES / "MR_truncated.dcm", tmp_path / "junk.dcm", FILES / "rtplan.dcm"):
        with pytest.raises(DataError, match=str(bad.name)):
            decode_dicom(bad)
