"""NIfTI slices (with masks) and MedMNIST npz files, written into tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medfed.data.sources.errors import DataError
from medfed.data.sources.medmnist import load_medmnist
from medfed.data.sources.nifti import load_nifti
from medfed.data.sources.options import ImageOptions, MedMnistSource, NiftiSource

NONE = ImageOptions(size=4, resize="stretch", intensity="none")


def _vol(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def test_slices_along_axis_with_masks(tmp_path: Path, write_csv: Any) -> None:
    vol = np.arange(4 * 4 * 5, dtype=np.float32).reshape(4, 4, 5)
    mask = (vol % 2 == 0).astype(np.uint8)
    _vol(tmp_path / "v.nii.gz", vol)
    _vol(tmp_path / "m.nii.gz", mask)
    m = write_csv(tmp_path / "m.csv", [{"path": "v.nii.gz", "label": "1", "mask_path": "m.nii.gz",
                                        "patient_id": "P"}])  # fmt: skip
    data = load_nifti(NiftiSource(manifest=m, axis=2, slice_range=(1, 5), every_k=2), image=NONE)
    assert data.case_ids == ("v.nii.gz#1", "v.nii.gz#3")
    assert data.patient_ids == ("P", "P")
    np.testing.assert_array_equal(data.images[1, 0].numpy(), np.clip(vol[:, :, 3], 0, 255))
    assert data.masks is not None
    np.testing.assert_array_equal(data.masks[0].numpy(), mask[:, :, 1])
    pad5 = ImageOptions(size=5, resize="pad", intensity="none")
    ax0 = load_nifti(NiftiSource(manifest=m, axis=0), image=pad5)
    assert len(ax0) == 4
    np.testing.assert_array_equal(ax0.images[2, 0, :4].numpy(), vol[2])  # 4x5 padded to 5x5


def test_corrupt_nifti(tmp_path: Path, write_csv: Any) -> None:
    """Slices mode; volume mode has its own tests in test_nifti_volume.py."""
    _vol(tmp_path / "v.nii", np.zeros((4, 4, 3), np.float32))
    raw = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(raw[: len(raw) - 20])
    m = write_csv(tmp_path / "m.csv", [{"path": "v.nii", "label": "a"},
                                       {"path": "t.nii", "label": "a"}])  # fmt: skip
    with pytest.raises(DataError, match=rf"row 3: {tmp_path / 't.nii'}: truncated"):
        load_nifti(NiftiSource(manifest=m), image=NONE)
    data = load_nifti(NiftiSource(manifest=m, on_error="skip"), image=NONE)
    assert len(data) == 3 and len(data.skipped) == 1


def fake_medmnist(path: Path, *, n: int = 20, rgb: bool = False, k: int = 1, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in (("train", n), ("val", n // 2), ("test", n // 2)):
        shape = (m, 28, 28, 3) if rgb else (m, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (m, k)).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_medmnist_splits_and_pixels(tmp_path: Path) -> None:
    p = fake_medmnist(tmp_path / "derma.npz", rgb=True)
    opts = ImageOptions(size=28, channels=3, intensity="none")
    data = load_medmnist(MedMnistSource(path=p, use=["train", "test"]), image=opts)
    raw = np.load(p)
    assert len(data) == 30 and data.split == ("train",) * 20 + ("test",) * 10
    np.testing.assert_array_equal(data.images[0].numpy(), raw["train_images"][0].transpose(2, 0, 1))
    np.testing.assert_array_equal(data.labels.numpy()[20:], raw["test_labels"][:, 0])
    assert data.case_ids[20] == "derma:test:0"


def test_medmnist_multilabel_and_corrupt(tmp_path: Path) -> None:
    p = fake_medmnist(tmp_path / "chest.npz", k=4)
    with pytest.raises(DataError, match=r"chest.npz array 'train_labels': multi-label"):
        load_medmnist(MedMnistSource(path=p), image=NONE)
    data = load_medmnist(MedMnistSource(path=p, label_column=2), image=NONE)
    np.testing.assert_array_equal(data.labels.numpy()[:20], np.load(p)["train_labels"][:, 2])
    raw = p.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.npz: not a readable .npz"):
        load_medmnist(MedMnistSource(path=tmp_path / "cut.npz"), image=NONE)
    np.savez(tmp_path / "nokey.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="nokey.npz: no array 'train_labels'"):
        load_medmnist(MedMnistSource(path=tmp_path / "nokey.npz", use=["train"]), image=NONE)
