"""Pixel data in de-identification: flag possible burned-in text, black out a configured region.

Why a module of its own: the attribute profile never looks at pixels, so pixels get their own,
deliberately narrow policy. Pixel data is never touched unless a mask rectangle is configured;
images that may carry burned-in annotations are flagged in the audit either way, because the Basic
Profile cannot clean pixels.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from medfed.data.deid_types import DeidError

__all__ = ["may_have_burned_in_annotation", "parse_mask_rect"]


_MASK_TO_EDGE = 65535  # Rows/Columns are US, so this reaches any image edge
_PIXEL_DATA = 0x7FE00010


def parse_mask_rect(spec: str) -> tuple[int, int, int, int]:
    """Parse a CLI mask spec: ``"top,left,height,width"`` or ``"rows"`` (a full-width top banner).

    Why the short form: ultrasound and secondary-capture devices typically burn the patient
    banner into the top rows, so "the top N rows" is the common site configuration.
    """
    try:
        parts = [int(p) for p in spec.split(",")]
    except ValueError as exc:
        raise DeidError(
            f"mask spec {spec!r} must be integers: rows or top,left,height,width"
        ) from exc
    if len(parts) == 1:
        parts = [0, 0, parts[0], _MASK_TO_EDGE]
    if len(parts) != 4 or any(p < 0 for p in parts) or parts[2] == 0 or parts[3] == 0:
        raise DeidError(
            f"mask spec {spec!r} must be rows or top,left,height,width (>= 0, size > 0)"
        )
    top, left, height, width = parts
    return (top, left, height, width)


def may_have_burned_in_annotation(ds: Dataset) -> bool:
    """True when the image may carry burned-in text the Basic Profile cannot remove.

    BurnedInAnnotation "YES" always counts; ultrasound and secondary capture routinely burn in
    the patient banner, so they count unless the device explicitly declared "NO".
    """
    if _PIXEL_DATA not in ds:
        return False
    burned = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if burned == "YES":
        return True
    if burned == "NO":
        return False
    sop_class = str(ds.get("SOPClassUID", ""))
    is_us = str(ds.get("Modality", "")).upper() == "US" or sop_class.startswith(
        ("1.2.840.10008.5.1.4.1.1.6.", "1.2.840.10008.5.1.4.1.1.3.")
    )
    is_sc = sop_class.startswith("1.2.840.10008.5.1.4.1.1.7") or "ConversionType" in ds
    return is_us or is_sc


def _mask_pixels(ds: Dataset, rect: tuple[int, int, int, int]) -> str:
    """Zero ``rect`` in every frame, store uncompressed Explicit VR Little Endian.

    Why re-encode: compressed pixel data cannot be edited in place, and writing uncompressed is
    the only lossless choice that every reader supports. Colour data decoded from YBR comes back
    as RGB, so the Photometric Interpretation is updated to match.
    """
    arr = np.array(ds.pixel_array)  # writable copy
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows_axis = 1 if frames > 1 else 0
    top, left, height, width = rect
    index: list[slice] = [slice(None)] * arr.ndim
    index[rows_axis] = slice(top, top + height)
    index[rows_axis + 1] = slice(left, left + width)
    arr[tuple(index)] = 0
    photometric = str(ds.PhotometricInterpretation)
    if samples == 3 and photometric.startswith("YBR"):
        photometric = "RGB"
    bits_stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    n_rows, n_cols = arr.shape[rows_axis], arr.shape[rows_axis + 1]
    h = max(0, min(top + height, n_rows) - top)
    w = max(0, min(left + width, n_cols) - left)
    return f"top={top} left={left} height={h} width={w}"
