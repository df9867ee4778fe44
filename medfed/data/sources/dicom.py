"""DICOM source: files, folders or a manifest, decoded with pydicom's own pixel pipeline.

Why pydicom's functions rather than our own maths: rescale slope/intercept, modality LUTs, VOI
LUTs and windowing have edge cases (signedness, LUT descriptors, sigmoid windows) that pydicom
already gets right and tests. Order, as the standard's grayscale pipeline: stored values ->
modality LUT (e.g. HU) -> VOI (the file's display window, if ``voi``) -> MONOCHROME1 inversion
(so bright always means dense / echogenic) -> our uint8 conversion. Colour: pydicom 3's
``pixel_array`` already converts YBR_* to RGB; palette colour goes through its colour LUT.
A compressed transfer syntax without an installed decoder is a DataError that keeps pydicom's
message (it names the plugins to install) and adds the file and the transfer syntax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from medfed.data.sources.errors import DataError
from medfed.data.sources.image import LoadedData
from medfed.data.sources.options import DicomKey, DicomSource, ImageOptions, Intensity, OnError
from medfed.data.sources.table import (
    Decoded,
    Record,
    Row,
    assemble,
    manifest_records,
    read_manifest,
    resolve,
)

_IGNORED = {"DICOMDIR"}


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` name, or the 'DICM' marker at byte 128 (many exports have no extension)."""
    if path.name in _IGNORED or path.name.startswith("."):
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def find_dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_dicom_file(p))


def _read(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return pydicom.dcmread(path)
    except Exception as err:  # InvalidDicomError, truncated tags, bad VRs...
        raise DataError(
            f"{path}: not a readable DICOM file ({type(err).__name__}: {err})"
        ) from None


def _transfer_syntax(ds: Dataset) -> str:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"


def _display_range(ds: Dataset) -> tuple[float, float]:
    """The output range of the file's VOI transform: what its window maps to.

    Pushing the most extreme inputs through ``apply_voi_lut`` gives the range pydicom uses
    (it depends on bits stored, signedness, rescale and LUT descriptors), without re-deriving it.
    """
    ends = apply_voi_lut(np.array([-(2.0**40), 2.0**40]), ds, index=0)
    if "VOILUTSequence" in ds and "WindowCenter" not in ds:
        ends = apply_voi_lut(np.array([-(2**40), 2**40], dtype=np.int64), ds, index=0)
    lo, hi = float(np.min(ends)), float(np.max(ends))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _gray(
    arr: np.ndarray, ds: Dataset, *, voi: bool
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Modality LUT, optional VOI, MONOCHROME1 inversion for one or more gray frames."""
    out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    rng: tuple[float, float] | None = None
    if voi and ("WindowCenter" in ds or "VOILUTSequence" in ds):
        out = np.asarray(apply_voi_lut(out, ds, index=0), dtype=np.float64)
        rng = _display_range(ds)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        lo, hi = rng if rng is not None else (float(out.min()), float(out.max()))
        out = (lo + hi) - out  # per frame would differ by frame; one range keeps cine consistent
    return out, rng


def decode_dicom(path: Path, *, frame: int | str = 0, voi: bool = True) -> Decoded:
    """One DICOM file -> frames ready for conversion (see module docstring for the order)."""
    ds = _read(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"{path}: no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if isinstance(frame, int) and frame >= n:
            raise DataError(f"{path}: frame {frame} requested but the file has {n} frame(s)")
        arr = pixel_array(ds, index=None if frame == "all" or n == 1 else int(frame))
        frames = list(arr) if frame == "all" and n > 1 else [arr]
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        rng = None
        if photometric == "PALETTE COLOR":
            frames = [np.asarray(apply_color_lut(f, ds)) for f in frames]
        elif int(ds.get("SamplesPerPixel", 1)) == 1:
            stack, rng = _gray(np.stack(frames), ds, voi=voi)
            frames = list(stack)
    except DataError:
        raise
    except Exception as err:  # missing decoder plugin, corrupt stream, inconsistent header...
        raise DataError(f"{path}: cannot decode pixel data ({_transfer_syntax(ds)}): "
                        f"{type(err).__name__}: {err}") from None  # fmt: skip
    uid = ds.get("SOPInstanceUID")
    patient = ds.get("PatientID")
    suffixes = [f"#{k}" for k in range(len(frames))] if frame == "all" and n > 1 else [""]
    info = {"dtype": str(arr.dtype), "bits": str(ds.get("BitsStored", "?")),
            "transfer_syntax": _transfer_syntax(ds), "photometric": photometric}  # fmt: skip
    return Decoded(frames, suffixes, case_id=str(uid) if uid else None,
                   patient_id=str(patient) if patient else None, display_range=rng, info=info)  # fmt: skip


def dicom_records(spec: DicomSource) -> tuple[list[Record], bool]:
    """The files of a DICOM source, and whether they came from a manifest (rows carry labels)."""
    path = spec.path
    if path.suffix.lower() == ".csv":
        root = spec.root if spec.root is not None else path.parent
        return manifest_records(read_manifest(path, required=("path", "label")), root), True
    if path.is_dir():
        files = find_dicom_files(path)
        if not files:
            raise DataError(f"{path}: no DICOM files found (looked for *.dcm and the DICM marker)")
        return [Record(p) for p in files], False
    if path.is_file():
        return [Record(path)], False
    raise DataError(f"{path}: no such file or folder")


def label_lookup(spec: DicomSource) -> dict[str, Row]:
    """Rows of ``labels_csv`` keyed by SOPInstanceUID or by resolved path."""
    if spec.labels_csv is None:
        raise DataError(f"{spec.path}: a DICOM file or folder needs labels_csv (a CSV keyed by "
                        f"{spec.key}) or use a manifest CSV with path and label columns")  # fmt: skip
    col = str(spec.key)
    rows = read_manifest(spec.labels_csv, required=(col, "label"))
    out: dict[str, Row] = {}
    for row in rows:
        key = row.get(col)
        if key is None:
            raise DataError(f"{row.at(col)}: empty key")
        if spec.key == DicomKey.PATH:
            key = str((resolve(row, col, spec.labels_csv.parent) or Path(key)).resolve())
        if key in out:
            raise DataError(f"{row.at(col)}: duplicate key {key!r} (also row {out[key].number})")
        out[key] = row
    return out


def load_dicom(
    spec: DicomSource, *, image: ImageOptions, on_error: OnError = OnError.RAISE
) -> LoadedData:
    """Load a DICOM source; case ids are SOPInstanceUIDs (``uid#k`` per frame with frame='all')."""
    records, from_manifest = dicom_records(spec)
    table = None if from_manifest else label_lookup(spec)
    voi = spec.voi and image.intensity != Intensity.WINDOW

    def lookup(rec: Record, dec: Decoded) -> Row | None:
        assert table is not None
        key = dec.case_id if spec.key == DicomKey.SOP_INSTANCE_UID else str(rec.path.resolve())
        return table.get(key or "")

    def decode(rec: Record) -> Decoded:
        if rec.row is not None and rec.row.get("path") is None:
            raise DataError(f"{rec.row.at('path')}: empty path")
        return decode_dicom(rec.path, frame=spec.frame, voi=voi)

    return assemble(
        records,
        decode,
        image=image,
        on_error=spec.on_error or on_error,
        classes=spec.classes,
        source=str(spec.path),
        case_id=lambda rec, dec: dec.case_id or str(rec.path),
        lookup=None if from_manifest else lookup,
    )
