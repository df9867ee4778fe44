"""Malformed bytes into every loader: the only exception allowed out is DataError."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medfed.data.sources.dicom import load_dicom
from medfed.data.sources.errors import DataError
from medfed.data.sources.medmnist import load_medmnist
from medfed.data.sources.nifti import load_nifti
from medfed.data.sources.options import (
    DicomSource,
    ImageCsvSource,
    ImageOptions,
    MedMnistSource,
    NiftiSource,
)
from medfed.data.sources.table import load_image_csv

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
OPTS = ImageOptions(size=8)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def _nifti() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.nii"
        nib.save(nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4)), p)
        return p.read_bytes()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.zeros((3, 1)))
    return buf.getvalue()


VALID = {
    "png": _png(),
    "dcm": (FILES / "MR_small.dcm").read_bytes(),
    "nii": _nifti(),
    "npz": _npz(),
}


def _load(kind: str, blob: bytes) -> None:
    d = Path(tempfile.mkdtemp())
    try:
        f = d / f"x.{kind}"
        f.write_bytes(blob)
        (d / "m.csv").write_text(f"path,label\nx.{kind},a\n")
        loaders: dict[str, Callable[[], object]] = {
            "png": lambda: load_image_csv(ImageCsvSource(manifest=d / "m.csv"), image=OPTS),
            "dcm": lambda: load_dicom(DicomSource(path=d / "m.csv"), image=OPTS),
            "nii": lambda: load_nifti(NiftiSource(manifest=d / "m.csv"), image=OPTS),
            "npz": lambda: load_medmnist(MedMnistSource(path=f, use=["train"]), image=OPTS),
        }
        with contextlib.suppress(DataError):
            loaders[kind]()
    finally:
        shutil.rmtree(d)


kinds = st.sampled_from(sorted(VALID))


@FUZZ
@given(kind=kinds, blob=st.binary(max_size=2048))
def test_random_bytes(kind: str, blob: bytes) -> None:
    _load(kind, blob)


@FUZZ
@given(kind=kinds, cut=st.floats(0.0, 1.0))
def test_truncations(kind: str, cut: float) -> None:
    valid = VALID[kind]
    _load(kind, valid[: int(len(valid) * cut)])


@FUZZ
@given(kind=kinds, keep=st.integers(4, 400), garbage=st.binary(min_size=1, max_size=512))
def test_valid_header_then_garbage(kind: str, keep: int, garbage: bytes) -> None:
    _load(kind, VALID[kind][:keep] + garbage)


@FUZZ
@given(kind=kinds, data=st.data())
def test_byte_flips(kind: str, data: st.DataObject) -> None:
    blob = bytearray(VALID[kind])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    _load(kind, bytes(blob))
