"""DICOM de-identification for a site's archive before it joins a federation (issue #4).

Why this exists: a federated study never ships images off-site, but sites still exchange metadata
(cohort counts, audits, failure cases) and may later pool a validation set. Everything the site
exports must therefore already be de-identified with the DICOM PS3.15 Annex E *Basic Application
Level Confidentiality Profile* (the table lives in :mod:`medfed.data.deid_profile`), while keeping
what a study needs to stay linkable *within* the site (see :mod:`medfed.data.deid_pseudonyms`).

The work is split by concern; this module walks a folder (or one file), refuses to overwrite
anything, writes the outputs and the audit, and re-exports the public API of the others:

* :mod:`medfed.data.deid_dataset`: the profile applied to one in-memory dataset.
* :mod:`medfed.data.deid_pseudonyms`: the keyed pseudonyms that keep a site's data linkable.
* :mod:`medfed.data.deid_pixels`: burned-in annotation flags and pixel masking.
* :mod:`medfed.data.deid_types`: options, refusals and audit records.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from medfed.data.deid_dataset import _tag_str, deidentify_dataset
from medfed.data.deid_pixels import _PIXEL_DATA, may_have_burned_in_annotation, parse_mask_rect
from medfed.data.deid_pseudonyms import _hmac, pseudonymize_uid
from medfed.data.deid_types import (
    AUDIT_COLUMNS,
    AUDIT_FILENAME,
    AuditAction,
    AuditRow,
    DeidError,
    DeidOptions,
    DeidReport,
    _check_options,
)

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


_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


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
