"""NIfTI ``mode: volume``: one whole, RAS-reoriented, resampled 3-D case per manifest row."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medfed.data.check import check_source
from medfed.data.sources.errors import DataError
from medfed.data.sources.federation import FilesDataConfig, SiteSpec, build_files_federation
from medfed.data.sources.nifti import load_nifti
from medfed.data.sources.options import ImageOptions, NiftiSource, OnError

NONE = ImageOptions(intensity="none")  # values as they are: exact where a test computes them


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _volume(path: Path, **kw: Any) -> NiftiSource:
    return NiftiSource(manifest=path, mode="volume", **kw)


def _ramp(shape: tuple[int, int, int]) -> np.ndarray:
    """Integer voxel values in [0, 250], so intensity 'none' keeps them as they are."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 251


def test_shapes_dtypes_labels_and_rows(tmp_path: Path, write_csv: Any) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(["benign", "malignant", "benign"]):
        _save(tmp_path / f"v{i}.nii.gz", rng.normal(100, 30, (20, 24, 16)).astype(np.float32))
        _save(tmp_path / f"m{i}.nii.gz", rng.integers(0, 3, (20, 24, 16)).astype(np.uint8))
        rows.append({"path": f"v{i}.nii.gz", "label": label, "mask_path": f"m{i}.nii.gz",
                     "patient_id": f"P{i // 2}", "split": ["train", "TRAIN", "val"][i],
                     "scanner": f"s{i}"})  # fmt: skip
    m = write_csv(tmp_path / "m.csv", rows)
    data = load_nifti(_volume(m, volume_size=(7, 9, 11)), image=ImageOptions())
    assert data.images.shape == (3, 1, 7, 9, 11) and data.images.dtype == torch.uint8
    assert data.masks is not None and data.masks.shape == (3, 7, 9, 11)
    assert data.masks.dtype == torch.uint8
    assert set(np.unique(data.masks.numpy())) <= {0, 1, 2}  # labels, never interpolated values
    assert data.label_names == ("benign", "malignant")
    assert data.labels.tolist() == [0, 1, 0]
    assert data.case_ids == ("v0.nii.gz", "v1.nii.gz", "v2.nii.gz")
    assert data.patient_ids == ("P0", "P0", "P1")
    assert data.split == ("train", "train", "val")
    assert data.metadata == {"scanner": ("s0", "s1", "s2")}
    assert data.skipped == ()
    rgb = load_nifti(_volume(m, volume_size=(4, 4, 4)), image=ImageOptions(channels=3))
    assert rgb.images.shape == (3, 3, 4, 4, 4)
    assert bool((rgb.images[:, 0] == rgb.images[:, 2]).all())


def test_volume_d_is_the_slice_mode_axis(tmp_path: Path, write_csv: Any) -> None:
    """D runs along ``axis``; H, W are the other two RAS axes in order: volume[d] == slice d."""
    vol = _ramp((10, 12, 6))
    _save(tmp_path / "v.nii", vol)
    m = write_csv(tmp_path / "m.csv", [{"path": "v.nii", "label": "1"}])
    axial = load_nifti(_volume(m, volume_size=(6, 10, 12)), image=NONE)
    np.testing.assert_array_equal(axial.images[0, 0].numpy(), np.moveaxis(vol, 2, 0))
    sag = load_nifti(_volume(m, axis=0, volume_size=(10, 12, 6)), image=NONE)
    np.testing.assert_array_equal(sag.images[0, 0].numpy(), vol)
    cor = load_nifti(_volume(m, axis=1, volume_size=(12, 10, 6)), image=NONE)
    np.testing.assert_array_equal(cor.images[0, 0].numpy(), vol.transpose(1, 0, 2))
    # slices mode along axis 0: its 12x6 slice d, zero-padded to 12x12 (columns 3:9), is d here
    sl = load_nifti(NiftiSource(manifest=m, axis=0), image=ImageOptions(size=12, intensity="none"))
    assert sl.case_ids[3] == "v.nii#3"
    np.testing.assert_array_equal(sl.images[3, 0, :, 3:9].numpy(), sag.images[0, 0, 3].numpy())


def test_resampling_image_trilinear_mask_nearest(tmp_path: Path, write_csv: Any) -> None:
    """2x downsampling, by hand: trilinear (align_corners=False) samples output i at input
    2i + 0.5; nearest-exact takes input voxel 2i + 1."""
    x, y, z = np.meshgrid(np.arange(8), np.arange(8), np.arange(8), indexing="ij")
    vol = (16 * z + 2 * x).astype(np.float32)  # linear, so trilinear is exact: <= 14 + 112
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:4, 4:8] = 3  # x 2:6, y 2:4, z 4:8
    mask[0:2, 6:8, 0:2] = 1
    _save(tmp_path / "v.nii", vol)
    _save(tmp_path / "m.nii", mask)
    m = write_csv(tmp_path / "m.csv", [{"path": "v.nii", "label": "0", "mask_path": "m.nii"}])
    data = load_nifti(_volume(m, volume_size=(4, 4, 4)), image=NONE)
    assert data.masks is not None
    out = data.masks[0].numpy()  # (D, H, W) = (z, x, y)
    want = np.zeros((4, 4, 4), np.uint8)
    # output i keeps input 2i + 1: z in [4, 8) -> i 2..3, x in [2, 6) -> 1..2, y in [2, 4) -> 1
    want[2:4, 1:3, 1:2] = 3
    want[0:1, 0:1, 3:4] = 1  # z in [0, 2) -> 0, x in [0, 2) -> 0, y in [6, 8) -> 3
    np.testing.assert_array_equal(out, want)
    i = np.arange(4)
    img = 16 * (2 * i[:, None, None] + 0.5) + 2 * (2 * i[None, :, None] + 0.5)  # z (D), x (H)
    np.testing.assert_array_equal(data.images[0, 0].numpy(), np.broadcast_to(img, (4, 4, 4)))
    # upsampling too: labels stay a subset of the original ones
    up = load_nifti(_volume(m, volume_size=(13, 5, 17)), image=NONE)
    assert up.masks is not None and set(np.unique(up.masks.numpy())) == {0, 1, 3}


def test_flipped_and_permuted_affines_give_the_canonical_array(
    tmp_path: Path, write_csv: Any
) -> None:
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 200, (20, 24, 16)).astype(np.float32)
    mask = (vol > 150).astype(np.uint8)
    flip = np.array([[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    perm = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    _save(tmp_path / "ras.nii.gz", vol)
    _save(tmp_path / "ras_m.nii.gz", mask)
    _save(tmp_path / "flip.nii.gz", vol[::-1].copy(), flip)  # stored L->R reversed ("LAS")
    _save(tmp_path / "flip_m.nii.gz", mask[::-1].copy(), flip)
    _save(tmp_path / "perm.nii.gz", vol.transpose(1, 0, 2).copy(), perm)  # y stored first
    _save(tmp_path / "perm_m.nii.gz", mask.transpose(1, 0, 2).copy(), perm)
    m = write_csv(tmp_path / "m.csv", [{"path": f"{n}.nii.gz", "label": "0",
                                        "mask_path": f"{n}_m.nii.gz"}
                                       for n in ("ras", "flip", "perm")])  # fmt: skip
    native = load_nifti(_volume(m, volume_size=(16, 20, 24)), image=NONE)
    np.testing.assert_array_equal(native.images[0, 0].numpy(), np.moveaxis(vol, 2, 0))
    small = load_nifti(_volume(m, volume_size=(5, 7, 9)), image=ImageOptions())
    for data in (native, small):
        assert data.masks is not None
        for k in (1, 2):
            assert bool((data.images[k] == data.images[0]).all())
            assert bool((data.masks[k] == data.masks[0]).all())


def test_intensity_is_mapped_per_volume(tmp_path: Path, write_csv: Any) -> None:
    vol = np.full((4, 5, 6), 500.0, np.float32)
    vol[:, :, 1] = np.linspace(-1000, 3000, 20, dtype=np.float32).reshape(4, 5)
    _save(tmp_path / "ct.nii", vol)
    _save(tmp_path / "other.nii", vol / 10.0 + 7.0)  # its own min / max: the same result
    m = write_csv(tmp_path / "m.csv", [{"path": "ct.nii", "label": "0"},
                                       {"path": "other.nii", "label": "0"}])  # fmt: skip
    size = (6, 4, 5)
    data = load_nifti(_volume(m, volume_size=size), image=ImageOptions())  # minmax
    img = data.images[0, 0].numpy()
    assert img.min() == 0 and img.max() == 255
    # slice 0 is constant 500: per volume it is (500 + 1000) / 4000 * 255 = 95.6 -> 96, where a
    # per-slice min-max would have made it 0
    assert (img[0] == 96).all() and (img[2:] == 96).all()
    np.testing.assert_array_equal(img[1], np.rint((vol[:, :, 1] + 1000) / 4000 * 255))
    np.testing.assert_array_equal(data.images[1].numpy(), data.images[0].numpy())
    pct = load_nifti(_volume(m, volume_size=size),
                     image=ImageOptions(intensity="percentile", percentiles=(10, 90)))  # fmt: skip
    lo, hi = np.percentile(vol.astype(np.float64), [10, 90])
    want = np.rint(np.clip((np.moveaxis(vol, 2, 0) - lo) * 255 / (hi - lo), 0, 255))
    assert np.abs(pct.images[0, 0].numpy().astype(int) - want).max() <= 1
    win = load_nifti(_volume(m, volume_size=size),
                     image=ImageOptions(intensity="window", window=(1000, 2000)))  # fmt: skip
    want = np.rint(np.clip(np.moveaxis(vol, 2, 0) * 255 / 2000, 0, 255))
    np.testing.assert_array_equal(win.images[0, 0].numpy(), want)


def test_mask_shape_mismatch_names_the_mask(tmp_path: Path, write_csv: Any) -> None:
    _save(tmp_path / "v.nii", np.zeros((6, 6, 4), np.float32))
    _save(tmp_path / "bad_m.nii", np.zeros((6, 6, 5), np.uint8))
    _save(tmp_path / "ok_m.nii", np.ones((6, 6, 4), np.uint8))
    m = write_csv(tmp_path / "m.csv", [{"path": "v.nii", "label": "0", "mask_path": "bad_m.nii"},
                                       {"path": "v.nii", "label": "1", "mask_path": "ok_m.nii"}])  # fmt: skip
    bad = tmp_path / "bad_m.nii"
    with pytest.raises(DataError, match=re.escape(f"row 2: {bad}: mask volume is (6, 6, 5)")):
        load_nifti(_volume(m, volume_size=(2, 3, 3)), image=NONE)
    data = load_nifti(_volume(m, volume_size=(2, 3, 3), on_error="skip"), image=NONE)
    assert len(data) == 1 and data.labels.tolist() == [1]
    assert data.masks is not None and bool((data.masks == 1).all())
    assert len(data.skipped) == 1 and str(bad) in data.skipped[0][1]


def test_corrupt_and_truncated_files(tmp_path: Path, write_csv: Any) -> None:
    _save(tmp_path / "v.nii", np.ones((4, 4, 3), np.float32))
    raw = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(raw[: len(raw) - 20])
    (tmp_path / "g.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    m = write_csv(tmp_path / "m.csv", [{"path": "v.nii", "label": "a"},
                                       {"path": "t.nii", "label": "a"},
                                       {"path": "g.nii.gz", "label": "b"}])  # fmt: skip
    with pytest.raises(DataError, match=r"2 bad file\(s\)") as err:
        load_nifti(_volume(m, volume_size=(2, 2, 2)), image=NONE)
    assert f"row 3: {tmp_path / 't.nii'}: truncated" in str(err.value)
    assert f"row 4: {tmp_path / 'g.nii.gz'}: not a readable NIfTI file" in str(err.value)
    data = load_nifti(_volume(m, volume_size=(2, 2, 2), on_error="skip"), image=NONE)
    assert len(data) == 1 and data.case_ids == ("v.nii",)
    assert [f for f, _ in data.skipped] == [f"{m} row 3", f"{m} row 4"]
    assert data.label_names == ("a",)  # the skipped row's label is not a class
    # the data section's on_error is the default when the source leaves it unset
    spec = _volume(m, volume_size=(2, 2, 2))
    assert len(load_nifti(spec, image=NONE, on_error=OnError.SKIP)) == 1


def test_label_and_split_errors(tmp_path: Path, write_csv: Any) -> None:
    _save(tmp_path / "v.nii", np.ones((4, 4, 3), np.float32))
    m = write_csv(tmp_path / "m.csv", [{"path": "v.nii", "label": "a", "split": "train"},
                                       {"path": "v.nii", "label": "zebra", "split": "val"},
                                       {"path": "v.nii", "label": "b", "split": "later"},
                                       {"path": "v.nii", "label": "", "split": "val"}])  # fmt: skip
    with pytest.raises(DataError, match=r"3 bad file\(s\)") as err:
        load_nifti(_volume(m, volume_size=(2, 2, 2), classes=["a", "b"]), image=NONE)
    msg = str(err.value)
    assert "row 3, column 'label': unknown label value 'zebra'" in msg
    assert "row 4, column 'split': unknown split value 'later'" in msg
    assert "row 5, column 'label': no label" in msg


def test_volume_options_validation(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    with pytest.raises(ValidationError, match="volume_size must be three positive sizes"):
        _volume(m, volume_size=(0, 4, 4))
    with pytest.raises(ValidationError, match="volume_size"):
        _volume(m, volume_size=(4, 4))
    with pytest.raises(ValidationError, match="slice_range and every_k apply to mode 'slices'"):
        _volume(m, slice_range=(0, 2))
    with pytest.raises(ValidationError, match="slice_range and every_k apply to mode 'slices'"):
        _volume(m, every_k=2)
    with pytest.raises(ValidationError, match="volume_size applies to mode 'volume' only"):
        NiftiSource(manifest=m, volume_size=(4, 4, 4))
    assert _volume(m).volume_size == (32, 64, 64)


def test_volumes_build_a_federation_and_pass_data_check(tmp_path: Path, write_csv: Any) -> None:
    rng = np.random.default_rng(2)
    rows = []
    for i in range(6):
        _save(tmp_path / f"v{i}.nii.gz", rng.normal(0, 1, (10, 12, 8)).astype(np.float32))
        _save(tmp_path / f"m{i}.nii.gz", rng.integers(0, 2, (10, 12, 8)).astype(np.uint8))
        rows.append({"path": f"v{i}.nii.gz", "label": str(i % 2), "mask_path": f"m{i}.nii.gz",
                     "split": "val" if i >= 4 else "train"})  # fmt: skip
    m = write_csv(tmp_path / "m.csv", rows)
    spec = _volume(m, volume_size=(4, 6, 6))
    fed, report = build_files_federation(
        FilesDataConfig(sites=[SiteSpec(name="a", source=spec)], image=ImageOptions())
    )
    train = fed.sites[0].train
    assert train.images.shape == (4, 1, 4, 6, 6) and len(fed.sites[0].val) == 2
    assert train.masks is not None and train.masks.shape == (4, 4, 6, 6)
    assert report.sites[0].n_train == 4 and report.label_names == ("0", "1")
    checked = check_source(spec)
    assert checked.ok and checked.sizes == {"10x12x8": 6}
