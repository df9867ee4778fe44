"""DICOM de-identification for a site's archive before it joins a federation (issue #4).

Why this exists: a federated study never ships images off-site, but sites still exchange metadata
(cohort counts, audits, failure cases) and may later pool a validation set. Everything the site
exports must therefore already be de-identified with the DICOM PS3.15 Annex E *Basic Application
Level Confidentiality Profile* (the table lives in :mod:`medfed.data.deid_profile`), while keeping
what a study needs to stay linkable *within* the site:

* UIDs are replaced by keyed pseudonyms (HMAC-SHA-256 under the ``2.25.`` root), so the same input
  UID maps to the same output UID in every file of the site and Study/Series/Frame-of-Reference
  relationships survive; a different site secret gives unrelated UIDs, so two sites cannot join on
  them.
* PatientID/PatientName become keyed pseudonyms of the original PatientID, so a site can still
  group a patient's studies without storing who the patient is.
* Optionally, dates are shifted by a per-patient offset (the "Retain Longitudinal Temporal
  Information with Modified Dates" option), which keeps intervals within a patient.

Compound action codes of the table depend on the IOD's attribute Type, which this module does not
model. It resolves them to the action that is safe for *every* Type and still leaves a valid file:

======  ==========================================================================================
code    resolved action
======  ==========================================================================================
Z/D     D: a non-empty dummy satisfies Type 1 as well as Type 2.
X/Z     Z: an empty value satisfies Type 2 and 3; removing could break a Type 2 attribute.
X/D     D: a dummy satisfies Type 1 and 3.
X/Z/D   D: a dummy satisfies Types 1, 2 and 3.
X/Z/U*  keep the sequence and apply the profile inside it, so the referenced UIDs are remapped
        consistently (references between de-identified instances keep working).
C       D: cleaning free text reliably is not attempted; a dummy is the conservative choice.
======  ==========================================================================================

A D (dummy) on a *sequence* (e.g. Institution Code Sequence, Content Sequence) empties the
sequence instead: its items hold codes and free text the table does not list, so recursing would
leak them, and an empty sequence is still present for Type 2.

Pixel data is never touched unless a mask rectangle is configured; images that may carry burned-in
annotations are flagged in the audit either way, because the Basic Profile cannot clean pixels.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian

from medfed.data.deid_profile import (
    BASIC_PROFILE,
    PROFILE_EDITION,
    REPEATING_GROUP_ROWS,
    ProfileAction,
    ProfileRow,
)
from medfed.types import StrEnum

__all__ = [
    "AUDIT_COLUMNS",
    "AUDIT_FILENAME",
    "AuditAction",
    "AuditRow",
    "DeidError",
    "DeidOptions",
    "DeidReport",
    "deidentify_dataset",
    "deidentify_tree",
    "may_have_burned_in_annotation",
    "parse_mask_rect",
    "pseudonymize_uid",
]

AUDIT_FILENAME = "deid_audit.csv"
AUDIT_COLUMNS = (
    "input_path",
    "output_path",
    "tag",
    "keyword",
    "action",
    "old_value_hash",
    "new_value",
)
MIN_SECRET_BYTES = 16
"""Recommended minimum: below this an attacker could brute-force the secret from the pseudonyms."""

_MAX_UID_LEN = 64
_DUMMY_TEXT = "ANONYMIZED"
_MASK_TO_EDGE = 65535  # Rows/Columns are US, so this reaches any image edge
_DATE_SHIFT_MAX_DAYS = 365

# Tags handled specially rather than by their table row.
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_PATIENT_BIRTH_DATE = 0x00100030
_PIXEL_DATA = 0x7FE00010
_MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# File-meta AE titles name the sending/receiving stations; the table's AE-title rows (Station AE
# Title, Retrieve AE Title, ...) are X, so the meta equivalents are removed as well.
_META_REMOVE = (0x00020016, 0x00020017, 0x00020018)


class DeidError(ValueError):
    """A refusal before anything is written: bad options, or a risk of overwriting the input."""


class AuditAction(StrEnum):
    """What happened to one attribute (or one file), as written to the audit's ``action`` column."""

    DUMMY = "dummy"  # D
    ZERO = "zero"  # Z
    REMOVE = "remove"  # X
    REPLACE_UID = "replace_uid"  # U
    PSEUDONYM = "pseudonym"  # PatientID / PatientName
    SHIFT_DATE = "shift_date"
    REMOVE_PRIVATE = "remove_private"
    SET = "set"  # de-identification markers we add
    MASK_PIXELS = "mask_pixels"
    FLAG_BURNED_IN = "flag_burned_in"
    SKIPPED = "skipped"  # file-level: not DICOM / not handled
    FAILED = "failed"  # file-level: corrupt or could not be written


class _Resolved(StrEnum):
    """The single action a (possibly compound) profile code resolves to; see module docstring."""

    DUMMY = "D"
    ZERO = "Z"
    REMOVE = "X"
    KEEP = "K"
    UID = "U"
    RECURSE = "recurse"


_RESOLVE: dict[ProfileAction, _Resolved] = {
    ProfileAction.D: _Resolved.DUMMY,
    ProfileAction.Z: _Resolved.ZERO,
    ProfileAction.X: _Resolved.REMOVE,
    ProfileAction.K: _Resolved.KEEP,
    ProfileAction.C: _Resolved.DUMMY,
    ProfileAction.U: _Resolved.UID,
    ProfileAction.Z_D: _Resolved.DUMMY,
    ProfileAction.X_Z: _Resolved.ZERO,
    ProfileAction.X_D: _Resolved.DUMMY,
    ProfileAction.X_Z_D: _Resolved.DUMMY,
    ProfileAction.X_Z_U: _Resolved.RECURSE,
}

_PROFILE_BY_TAG: dict[int, ProfileRow] = {row.tag: row for row in BASIC_PROFILE}


@dataclass(frozen=True)
class DeidOptions:
    """How to de-identify.

    ``site_secret`` keys every pseudonym (UIDs, patient IDs, date offsets, audit hashes); it must
    stay at the site, and the same secret must be reused for a site's later exports so that the
    pseudonyms stay consistent. ``mask_rect`` is ``(top, left, height, width)`` in pixels, clipped
    to each image; it is blacked out in every image that has pixel data.
    """

    site_secret: bytes
    shift_dates: bool = False
    mask_rect: tuple[int, int, int, int] | None = None
    rename_files: bool = False
    """Name outputs ``<pseudonym>.dcm`` in one flat folder: file and folder names exported from
    PACS often carry patient names or IDs. The pseudonym is an HMAC of the relative input path, so
    it is stable across exports and the audit (which stays at the site) maps it back."""


@dataclass(frozen=True)
class AuditRow:
    """One change to one dataset. ``tag``/``keyword`` are paths for elements inside sequences.

    ``old_value_hash`` is a short keyed hash, never the value: the audit is itself shared with
    reviewers and must not leak PHI, yet two rows with the same original value can be matched.
    """

    tag: str
    keyword: str
    action: AuditAction
    old_value_hash: str = ""
    new_value: str = ""


@dataclass(frozen=True)
class DeidReport:
    """Outcome of :func:`deidentify_tree`; paths are strings relative to the input root."""

    processed: int
    skipped: list[tuple[str, str]]
    failed: list[tuple[str, str]]
    burned_in: list[str]
    audit_path: Path


# --------------------------------------------------------------------------------------------
# Keyed pseudonyms
# --------------------------------------------------------------------------------------------


def _hmac(secret: bytes, purpose: str, value: str) -> bytes:
    """HMAC-SHA-256 with a purpose prefix, so a UID and a patient ID with equal text differ."""
    return hmac.new(secret, purpose.encode() + b"\x00" + value.encode(), hashlib.sha256).digest()


def pseudonymize_uid(uid: str, *, secret: bytes) -> str:
    """Map ``uid`` to ``2.25.<decimal of 128 HMAC bits>``: valid, <= 44 chars, stable per secret.

    ``2.25`` is the UUID-derived root (PS3.5 B.2), which needs no registered organisation root;
    128 bits keep collisions as unlikely as for random UUIDs.
    """
    number = int.from_bytes(_hmac(secret, "uid", uid.strip())[:16], "big")
    out = f"2.25.{number}"
    assert len(out) <= _MAX_UID_LEN
    return out


def _patient_pseudonym(key: str, *, secret: bytes) -> str:
    return _hmac(secret, "patient", key).hex()[:16].upper()


def _date_offset(key: str, *, secret: bytes) -> timedelta:
    """A per-patient shift of -1..-365 days; always backwards so no date lands in the future."""
    n = int.from_bytes(_hmac(secret, "date-shift", key)[:8], "big")
    return timedelta(days=-(1 + n % _DATE_SHIFT_MAX_DAYS))


def _value_hash(value: object, *, secret: bytes) -> str:
    if value is None or value == "" or (isinstance(value, (list, MultiValue)) and not value):
        return ""
    if isinstance(value, Sequence):
        text = f"<sequence of {len(value)} items>"
    elif isinstance(value, bytes):
        text = hashlib.sha256(value).hexdigest()
    else:
        text = str(value)
    return _hmac(secret, "audit", text).hex()[:12]


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


# --------------------------------------------------------------------------------------------
# Dataset-level de-identification (no I/O)
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    secret: bytes
    shift: timedelta | None
    patient_key: str
    rows: list[AuditRow] = field(default_factory=list)

    def log(
        self, tag: str, keyword: str, action: AuditAction, old: object = None, new: str = ""
    ) -> None:
        self.rows.append(AuditRow(tag, keyword, action, _value_hash(old, secret=self.secret), new))


def _profile_row(tag: int) -> ProfileRow | None:
    row = _PROFILE_BY_TAG.get(tag)
    if row is not None:
        return row
    for grp in REPEATING_GROUP_ROWS:
        if tag & grp.mask == grp.tag:
            return grp
    return None


def _tag_str(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def _dummy_for(elem: DataElement) -> object:
    """A non-empty value that is valid for the element's VR (the 'D' action)."""
    vr = elem.VR
    if vr == "DA":
        return "19000101"
    if vr == "TM":
        return "000000"
    if vr == "DT":
        return "19000101000000"
    if vr == "AS":
        return "000Y"
    if vr in ("IS", "DS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "US or SS"):
        return 0
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW"):
        return b"\x00" * 8
    if vr == "UR":
        return "urn:x-anonymized"
    return _DUMMY_TEXT  # PN, LO, SH, LT, ST, UT, UC, CS, AE: all accept this text


def _shift_one(text: str, offset: timedelta, vr: str) -> str | None:
    """Shift the date part of one DA/DT value; None when it is not a parseable full date."""
    text = text.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        shifted = datetime.strptime(text[:8], "%Y%m%d").date() + offset
    except ValueError:
        return None
    if shifted < date(1, 1, 1):
        return None
    return shifted.strftime("%Y%m%d") + (text[8:] if vr == "DT" else "")


def _shift_value(value: object, offset: timedelta, vr: str) -> object | None:
    if isinstance(value, (list, MultiValue)):
        out = [_shift_one(str(v), offset, vr) for v in value]
        return None if any(v is None for v in out) else out
    return _shift_one(str(value), offset, vr)


def _remap_uids(value: object, secret: bytes) -> object:
    if isinstance(value, (list, MultiValue)):
        return [pseudonymize_uid(str(v), secret=secret) for v in value if str(v)]
    return pseudonymize_uid(str(value), secret=secret)


def _is_empty(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, (list, MultiValue)) and not value)


def _walk(ds: Dataset, ctx: _Context, prefix: str, kw_prefix: str) -> None:
    """Apply the profile to every element of ``ds`` and, recursively, its sequence items."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        tag_path = prefix + _tag_str(elem.tag)
        kw_path = kw_prefix + (elem.keyword or "")
        if elem.tag.is_private:
            del ds[tag]
            ctx.log(tag_path, kw_path, AuditAction.REMOVE_PRIVATE, elem.value)
            continue
        if tag in (_PATIENT_ID, _PATIENT_NAME):
            _pseudonymize_patient(elem, ctx, tag_path, kw_path)
            continue
        row = _profile_row(int(tag))
        if ctx.shift is not None and elem.VR in ("DA", "DT") and tag != _PATIENT_BIRTH_DATE:
            # Modified Dates option: every date is shifted (listed or not) so that intervals
            # between any two dates of the patient survive; birth date stays per the profile
            # because it is the single most identifying date.
            if _is_empty(elem.value):
                continue
            shifted = _shift_value(elem.value, ctx.shift, elem.VR)
            if shifted is None:  # partial or malformed date: cannot shift, so do not keep
                old = elem.value
                elem.value = elem.empty_value
                ctx.log(tag_path, kw_path, AuditAction.ZERO, old)
            else:
                old = elem.value
                elem.value = shifted
                ctx.log(tag_path, kw_path, AuditAction.SHIFT_DATE, old, str(elem.value))
            continue
        if row is None:
            if elem.VR == "SQ":
                _walk_items(elem, ctx, tag_path, kw_path)
            continue
        if ctx.shift is not None and elem.VR == "TM":
            continue  # whole-day shifts leave times of day meaningful and non-identifying
        _apply(ds, elem, _RESOLVE[row.action], ctx, tag_path, kw_path)


def _walk_items(elem: DataElement, ctx: _Context, tag_path: str, kw_path: str) -> None:
    for i, item in enumerate(elem.value):
        _walk(item, ctx, f"{tag_path}[{i}].", f"{kw_path}[{i}].")


def _apply(
    ds: Dataset, elem: DataElement, action: _Resolved, ctx: _Context, tag_path: str, kw_path: str
) -> None:
    old = elem.value
    if action is _Resolved.KEEP:
        if elem.VR == "SQ":
            _walk_items(elem, ctx, tag_path, kw_path)
    elif action is _Resolved.RECURSE:
        if elem.VR == "SQ":
            _walk_items(elem, ctx, tag_path, kw_path)
        elif elem.VR == "UI" and not _is_empty(old):
            elem.value = _remap_uids(old, ctx.secret)
            ctx.log(tag_path, kw_path, AuditAction.REPLACE_UID, old, str(elem.value))
        elif not _is_empty(old):
            elem.value = elem.empty_value
            ctx.log(tag_path, kw_path, AuditAction.ZERO, old)
    elif action is _Resolved.REMOVE:
        del ds[elem.tag]
        ctx.log(tag_path, kw_path, AuditAction.REMOVE, old)
    elif action is _Resolved.ZERO or (action is _Resolved.DUMMY and elem.VR == "SQ"):
        if not _is_empty(old):
            elem.value = elem.empty_value
            ctx.log(tag_path, kw_path, AuditAction.ZERO, old)
    elif action is _Resolved.UID or (action is _Resolved.DUMMY and elem.VR == "UI"):
        if not _is_empty(old):
            elem.value = _remap_uids(old, ctx.secret)
            ctx.log(tag_path, kw_path, AuditAction.REPLACE_UID, old, str(elem.value))
    else:  # DUMMY
        elem.value = _dummy_for(elem)
        new = "<binary>" if isinstance(elem.value, bytes) else str(elem.value)
        ctx.log(tag_path, kw_path, AuditAction.DUMMY, old, new)


def _pseudonymize_patient(elem: DataElement, ctx: _Context, tag_path: str, kw_path: str) -> None:
    """Both PatientID and PatientName derive from the patient key, so they stay consistent."""
    old = elem.value
    token = _patient_pseudonym(ctx.patient_key, secret=ctx.secret)
    elem.value = f"ANON-{token}" if elem.tag == _PATIENT_ID else f"ANON^{token}"
    ctx.log(tag_path, kw_path, AuditAction.PSEUDONYM, old, str(elem.value))


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


def _check_options(options: DeidOptions) -> None:
    if not isinstance(options.site_secret, bytes) or not options.site_secret:
        raise DeidError("a non-empty site secret (bytes) is required to key the pseudonyms")
    if len(options.site_secret) < MIN_SECRET_BYTES:
        warnings.warn(
            f"site secret is shorter than {MIN_SECRET_BYTES} bytes; pseudonyms may be guessable",
            UserWarning,
            stacklevel=3,
        )
    rect = options.mask_rect
    if rect is not None and (len(rect) != 4 or any(int(v) < 0 for v in rect)):
        raise DeidError(f"mask_rect must be (top, left, height, width) >= 0: {rect}")


def _method_description(options: DeidOptions) -> list[str]:
    parts = [f"DICOM PS3.15 E.1 Basic Profile ({PROFILE_EDITION})", "medfed HMAC-SHA256 pseudonyms"]
    if options.shift_dates:
        parts.append("dates shifted per patient")
    if options.mask_rect is not None:
        parts.append("pixel region masked {},{},{},{}".format(*options.mask_rect))
    return parts


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def deidentify_dataset(ds: Dataset, *, options: DeidOptions) -> list[AuditRow]:
    """De-identify ``ds`` in place (file meta included) and return what changed.

    Pure with respect to I/O so it can be unit-tested and reused by other writers. Raises
    :class:`DeidError` for bad options and propagates pixel decoding errors when masking, so an
    image is never written with an unmasked banner the caller asked to remove.
    """
    _check_options(options)
    secret = options.site_secret
    patient_key = str(ds.get("PatientID", "") or "").strip() or str(ds.get("PatientName", "") or "")
    ctx = _Context(
        secret=secret,
        shift=_date_offset(patient_key, secret=secret) if options.shift_dates else None,
        patient_key=patient_key,
    )
    burned_in = may_have_burned_in_annotation(ds)

    _walk(ds, ctx, "", "")

    meta: FileMetaDataset | None = getattr(ds, "file_meta", None)
    if meta is not None:
        for tag in _META_REMOVE:
            if tag in meta:
                old = meta[tag].value
                kw = meta[tag].keyword
                del meta[tag]
                ctx.log(_tag_str(Tag(tag)), kw, AuditAction.REMOVE, old)
        if _MEDIA_STORAGE_SOP_INSTANCE_UID in meta:
            # PS3.10 requires the meta UID to equal SOPInstanceUID; copy the remapped one so a
            # file whose header disagreed is repaired rather than given a third UID.
            elem = meta[_MEDIA_STORAGE_SOP_INSTANCE_UID]
            old = elem.value
            elem.value = ds.get("SOPInstanceUID") or (
                pseudonymize_uid(str(old), secret=secret) if old else old
            )
            if elem.value != old:
                ctx.log(
                    _tag_str(elem.tag), elem.keyword, AuditAction.REPLACE_UID, old, str(elem.value)
                )

    if burned_in:
        ctx.log(
            "", "BurnedInAnnotation", AuditAction.FLAG_BURNED_IN, None, "may have burned-in text"
        )
    if options.mask_rect is not None and _PIXEL_DATA in ds:
        region = _mask_pixels(ds, options.mask_rect)
        ctx.log(_tag_str(Tag(_PIXEL_DATA)), "PixelData", AuditAction.MASK_PIXELS, None, region)
        old = ds.get("BurnedInAnnotation")
        ds.BurnedInAnnotation = "NO"
        ctx.log("(0028,0301)", "BurnedInAnnotation", AuditAction.SET, old, "NO")

    markers: list[tuple[str, object]] = [
        ("PatientIdentityRemoved", "YES"),
        ("DeidentificationMethod", _method_description(options)),
        (
            "LongitudinalTemporalInformationModified",
            "MODIFIED" if options.shift_dates else "REMOVED",
        ),
    ]
    codes = [_code_item("113100", "Basic Application Confidentiality Profile")]
    if options.shift_dates:
        codes.append(
            _code_item("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
        )
    for keyword, value in markers:
        old = ds.get(keyword)
        setattr(ds, keyword, value)
        ctx.log(_tag_str(ds.data_element(keyword).tag), keyword, AuditAction.SET, old, str(value))  # type: ignore[union-attr]
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
    ctx.log(
        "(0012,0064)",
        "DeidentificationMethodCodeSequence",
        AuditAction.SET,
        None,
        "/".join(str(c.CodeValue) for c in codes),
    )
    return ctx.rows


# --------------------------------------------------------------------------------------------
# Tree-level: walk, refuse overwrites, write outputs and the audit
# --------------------------------------------------------------------------------------------


class _CorruptDicom(Exception):
    """The file parsed only partially (pydicom silently accepts truncated files)."""


def _check_complete(ds: Dataset) -> None:
    """Fail loudly on truncation, which pydicom tolerates by returning a shorter dataset.

    Why: de-identifying a half-read file would silently drop pixel data or, worse, write a file
    whose missing tail the reader of the audit cannot see.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.value is not None
            and raw.length != 0xFFFFFFFF
            and len(raw.value) < raw.length
        ):
            raise _CorruptDicom(
                f"element {_tag_str(BaseTag(tag))} truncated: {len(raw.value)} of {raw.length} bytes"
            )
    for _ in ds.iterall():  # converts every raw element; truncated sequences raise here
        pass
    if _PIXEL_DATA in ds:
        tsyntax = getattr(ds.get("file_meta"), "TransferSyntaxUID", None)
        if tsyntax is not None and not tsyntax.is_compressed and "Rows" in ds:
            from pydicom.pixels.utils import get_expected_length

            expected = get_expected_length(ds, unit="bytes")
            if len(ds.PixelData) < expected:
                raise _CorruptDicom(
                    f"pixel data truncated: {len(ds.PixelData)} of {expected} bytes"
                )
    elif "Rows" in ds and "Columns" in ds and "BitsAllocated" in ds:
        raise _CorruptDicom("image attributes present but no pixel data (truncated file?)")


def _plan(src: Path, dst: Path, options: DeidOptions) -> list[tuple[Path, Path, str]]:
    if src.is_file():
        pairs = [(src, src.name)]
    else:
        files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        pairs = [(p, p.relative_to(src).as_posix()) for p in files]
    if options.rename_files:
        return [
            (p, dst / f"{_hmac(options.site_secret, 'path', rel).hex()[:24]}.dcm", rel)
            for p, rel in pairs
        ]
    return [(p, dst / rel, rel) for p, rel in pairs]


def _refuse_unsafe(src: Path, dst: Path, plan: list[tuple[Path, Path, str]]) -> None:
    if dst == src or dst.is_relative_to(src):
        raise DeidError(f"output {dst} must not be the input or inside it ({src})")
    if dst.exists() and not dst.is_dir():
        raise DeidError(f"output {dst} exists and is not a directory")
    clashes = [out for _, out, _ in plan if out.exists() or out.is_symlink()]
    audit = dst / AUDIT_FILENAME
    if audit.exists():
        clashes.append(audit)
    if clashes:
        shown = ", ".join(str(c) for c in clashes[:3])
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise DeidError(f"refusing to overwrite existing output files: {shown}{more}")


def _file_row(action: AuditAction, detail: str) -> AuditRow:
    return AuditRow("", "", action, "", detail)


def _process_file(
    path: Path, out: Path, options: DeidOptions
) -> tuple[AuditAction | None, str, list[AuditRow]]:
    """Returns (file-level outcome or None for success, detail, attribute rows)."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        return AuditAction.SKIPPED, "not a DICOM file (no DICM preamble)", []
    except Exception as exc:  # corrupt beyond parsing
        return AuditAction.FAILED, f"unreadable DICOM: {type(exc).__name__}: {exc}", []
    try:
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
            return AuditAction.SKIPPED, "DICOMDIR: regenerate it from the de-identified files", []
        _check_complete(ds)
        rows = deidentify_dataset(ds, options=options)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
    except DeidError:
        raise
    except Exception as exc:
        return AuditAction.FAILED, f"{type(exc).__name__}: {exc}", []
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("xb") as fh:  # "x": never overwrite, even if a file appeared since the check
        fh.write(buffer.getvalue())
    return None, "", rows


def _iter_csv_rows(inp: str, out: str, rows: list[AuditRow]) -> Iterator[list[str]]:
    for r in rows:
        yield [inp, out, r.tag, r.keyword, str(r.action), r.old_value_hash, r.new_value]


def deidentify_tree(src: Path, dst: Path, *, options: DeidOptions) -> DeidReport:
    """De-identify every DICOM file under ``src`` (or the single file ``src``) into ``dst``.

    Relative paths are mirrored; non-DICOM files are skipped and corrupt files reported, both
    in the audit and the report, without stopping the run. All refusals (bad options, ``dst``
    inside ``src``, an output that already exists) happen before anything is written.
    """
    _check_options(options)
    src = Path(src).resolve()
    dst = Path(dst).resolve()
    if not src.exists():
        raise DeidError(f"input {src} does not exist")
    plan = _plan(src, dst, options)
    _refuse_unsafe(src, dst, plan)
    dst.mkdir(parents=True, exist_ok=True)
    audit_path = dst / AUDIT_FILENAME

    processed = 0
    skipped: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    burned_in: list[str] = []
    with audit_path.open("x", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(AUDIT_COLUMNS)
        for path, out, rel in plan:
            outcome, detail, rows = _process_file(path, out, options)
            out_rel = (out.relative_to(dst)).as_posix()
            if outcome is AuditAction.SKIPPED:
                skipped.append((rel, detail))
                rows = [_file_row(outcome, detail)]
                out_rel = ""
            elif outcome is AuditAction.FAILED:
                failed.append((rel, detail))
                rows = [_file_row(outcome, detail)]
                out_rel = ""
            else:
                processed += 1
                if any(r.action is AuditAction.FLAG_BURNED_IN for r in rows):
                    burned_in.append(rel)
            writer.writerows(_iter_csv_rows(rel, out_rel, rows))
    return DeidReport(
        processed=processed,
        skipped=skipped,
        failed=failed,
        burned_in=burned_in,
        audit_path=audit_path,
    )
