"""The vocabulary every de-identification module shares: options, refusals, audit records.

Why a module of its own: the per-element profile (:mod:`medfed.data.deid_dataset`), the pixel
handling (:mod:`medfed.data.deid_pixels`) and the file walking (:mod:`medfed.data.deid`) all speak
in these types, so they sit below all of them; the audit's columns are defined here once because
reviewers read that file, and what it may contain (hashes, never values) is a privacy contract.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from medfed.types import StrEnum

__all__ = [
    "AUDIT_COLUMNS",
    "AUDIT_FILENAME",
    "MIN_SECRET_BYTES",
    "AuditAction",
    "AuditRow",
    "DeidError",
    "DeidOptions",
    "DeidReport",
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
