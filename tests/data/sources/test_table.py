"""image_csv source: real PNG / JPEG / TIFF files, labels, errors and on_error=skip."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medfed.data.sources.errors import DataError
from medfed.data.sources.options import ImageCsvSource, ImageOptions
from medfed.data.sources.table import load_image_csv


def test_formats_and_depths_convert_as_computed(tmp_path: Path, write_csv: Any) -> None:
    ramp16 = np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000 + 100
    Image.fromarray(ramp16).save(tmp_path / "a16.png")  # 16-bit PNG
    Image.fromarray(ramp16).save(tmp_path / "a16.tif")  # 16-bit TIFF
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    Image.fromarray(np.full((6, 8), 128, np.uint8)).save(tmp_path / "g.jpg", quality=95)
    rows = [{"path": n, "label": "0"} for n in ("a16.png", "a16.tif", "red.png", "g.jpg")]
    spec = ImageCsvSource(manifest=write_csv(tmp_path / "m.csv", rows))
    data = load_image_csv(spec, image=ImageOptions(size=8, resize="pad"))
    assert data.images.shape == (4, 1, 8, 8)
    expected = np.rint((ramp16 - 100) / 47000 * 255)
    for i in (0, 1):  # 16-bit read as 16-bit (not truncated), minmax over the true range
        np.testing.assert_array_equal(data.images[i, 0, 1:7].numpy(), expected)
        assert data.images[i, 0, 0].eq(0).all()  # padding rows
    # red -> BT.601 luma 76 (constant), minmax of a constant is 0; use intensity none to see it
    none = load_image_csv(spec, image=ImageOptions(size=8, resize="pad", intensity="none"))
    assert none.images[2, 0, 3, 3].item() == round(0.299 * 255)
    assert abs(int(none.images[3, 0, 3, 3]) - 128) <= 2  # JPEG is lossy, but barely here
    assert data.case_ids == ("a16.png", "a16.tif", "red.png", "g.jpg")
    assert data.patient_ids == data.case_ids  # fallback: the case id
    assert data.label_names == ("0",)


def test_string_labels_sorted_or_explicit_classes(labelled_folder: Path) -> None:
    o = ImageOptions(size=8)
    data = load_image_csv(ImageCsvSource(manifest=labelled_folder), image=o)
    assert data.label_names == ("benign", "malignant")
    assert data.labels.tolist() == [0, 1] * 4
    assert data.patient_ids[:3] == ("p0", "p0", "p1")
    assert data.metadata["scanner"][:3] == ("s0", "s1", "s2")
    flipped = load_image_csv(
        ImageCsvSource(manifest=labelled_folder, classes=["malignant", "benign"]), image=o
    )
    assert flipped.labels.tolist() == [1, 0] * 4


def test_unknown_label_names_row_and_value(labelled_folder: Path) -> None:
    spec = ImageCsvSource(manifest=labelled_folder, classes=["benign"])
    with pytest.raises(DataError) as err:
        load_image_csv(spec, image=ImageOptions(size=8))
    msg = str(err.value)
    assert f"{labelled_folder} row 3, column 'label'" in msg and "'malignant'" in msg
    assert "4 bad file(s)" in msg


def test_missing_column_names_column_and_file(tmp_path: Path, write_csv: Any) -> None:
    m = write_csv(tmp_path / "m.csv", [{"path": "a.png", "diagnosis": "x"}])
    with pytest.raises(DataError, match=rf"{tmp_path / 'm.csv'} column 'label': required column"):
        load_image_csv(ImageCsvSource(manifest=m), image=ImageOptions())


def test_missing_and_corrupt_files_raise_listing_all(labelled_folder: Path) -> None:
    root = labelled_folder.parent
    (root / "img1.png").unlink()
    data = (root / "img2.png").read_bytes()
    (root / "img2.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError) as err:
        load_image_csv(ImageCsvSource(manifest=labelled_folder), image=ImageOptions(size=8))
    msg = str(err.value)
    assert "2 bad file(s)" in msg
    assert f"{labelled_folder} row 3: {root / 'img1.png'}: file not found" in msg
    assert f"{labelled_folder} row 4: {root / 'img2.png'}: unreadable image" in msg


def test_skip_mode_loads_the_rest_and_counts(
    labelled_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (labelled_folder.parent / "img1.png").write_bytes(b"not a png")
    spec = ImageCsvSource(manifest=labelled_folder, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="medfed"):
        data = load_image_csv(spec, image=ImageOptions(size=8))
    assert len(data) == 7 and "img1.png" not in data.case_ids
    assert len(data.skipped) == 1 and "img1.png" in data.skipped[0][1]
    assert any("skipping" in r.message and "img1.png" in r.message for r in caplog.records)


def test_masks_and_root_and_split_column(tmp_path: Path, write_csv: Any, gray_png: Any) -> None:
    (tmp_path / "imgs").mkdir()
    gray_png(tmp_path / "imgs" / "a.png", 0, size=(4, 4))
    mask = np.zeros((4, 4), np.uint8)
    mask[:2] = 1
    Image.fromarray(mask).save(tmp_path / "imgs" / "a_mask.png")
    rows = [{"path": "a.png", "label": "1", "mask_path": "a_mask.png", "split": "Val"}]
    m = write_csv(tmp_path / "m.csv", rows)
    data = load_image_csv(ImageCsvSource(manifest=m, root=tmp_path / "imgs"),
                          image=ImageOptions(size=8, resize="stretch"))  # fmt: skip
    assert data.masks is not None and data.masks.shape == (1, 8, 8)
    assert data.masks[0, :4].eq(1).all() and data.masks[0, 4:].eq(0).all()
    assert data.split == ("val",)
    assert data.label_names == ("0", "1") and data.labels.tolist() == [1]


def test_bad_split_value_is_row_error(tmp_path: Path, write_csv: Any, gray_png: Any) -> None:
    gray_png(tmp_path / "a.png", 0)
    m = write_csv(tmp_path / "m.csv", [{"path": "a.png", "label": "x", "split": "holdout"}])
    with pytest.raises(DataError, match=r"row 2, column 'split': unknown split value 'holdout'"):
        load_image_csv(ImageCsvSource(manifest=m), image=ImageOptions(size=8))
