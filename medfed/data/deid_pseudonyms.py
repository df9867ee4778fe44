"""Keyed pseudonyms: what keeps a de-identified archive linkable within a site, never across.

Why a module of its own: every pseudonym (UIDs, patient IDs, date offsets, audit hashes, renamed
files) is an HMAC-SHA-256 under the site secret with a purpose prefix, and that one construction
is the whole linkability contract, so it is reviewed in one place:

* UIDs are replaced by keyed pseudonyms (HMAC-SHA-256 under the ``2.25.`` root), so the same input
  UID maps to the same output UID in every file of the site and Study/Series/Frame-of-Reference
  relationships survive; a different site secret gives unrelated UIDs, so two sites cannot join on
  them.
* PatientID/PatientName become keyed pseudonyms of the original PatientID, so a site can still
  group a patient's studies without storing who the patient is.
* Optionally, dates are shifted by a per-patient offset (the "Retain Longitudinal Temporal
  Information with Modified Dates" option), which keeps intervals within a patient.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

__all__ = ["pseudonymize_uid"]


_MAX_UID_LEN = 64
_DATE_SHIFT_MAX_DAYS = 365


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
