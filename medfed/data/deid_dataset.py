"""De-identify one in-memory DICOM dataset with the Basic Profile table (no file I/O).

Why a module of its own: this is the part a reviewer checks against PS3.15 Annex E row by row,
and it touches no files; walking folders and writing outputs and the audit live in
:mod:`medfed.data.deid`.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from medfed.data.deid_pixels import _PIXEL_DATA, _mask_pixels, may_have_burned_in_annotation
from medfed.data.deid_profile import (
    BASIC_PROFILE,
    PROFILE_EDITION,
    REPEATING_GROUP_ROWS,
    ProfileAction,
    ProfileRow,
)
from medfed.data.deid_pseudonyms import (
    _date_offset,
    _patient_pseudonym,
    _value_hash,
    pseudonymize_uid,
)
from medfed.data.deid_types import AuditAction, AuditRow, DeidOptions, _check_options
from medfed.types import StrEnum

__all__ = ["deidentify_dataset"]


_DUMMY_TEXT = "ANONYMIZED"

# Tags handled specially rather than by their table row.
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_PATIENT_BIRTH_DATE = 0x00100030
_MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003

# File-meta AE titles name the sending/receiving stations; the table's AE-title rows (Station AE
# Title, Retrieve AE Title, ...) are X, so the meta equivalents are removed as well.
_META_REMOVE = (0x00020016, 0x00020017, 0x00020018)


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
