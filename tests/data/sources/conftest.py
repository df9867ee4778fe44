"""Small real files for the source tests, written with Pillow / nibabel / numpy into tmp_path."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.data.sources.options import ImageOptions


def write_csv(
    path: Path, rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None
) -> Path:
    columns = list(columns or rows[0].keys())
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    return path


def gray_png(path: Path, value: int, size: tuple[int, int] = (8, 6)) -> Path:
    """A gray PNG with a left-to-right ramp starting at ``value`` (distinct bytes per value)."""
    h, w = size
    arr = (np.arange(w)[None, :].repeat(h, 0) + value).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path)
    return path


@pytest.fixture
def opts8() -> ImageOptions:
    return ImageOptions(size=8, resize="stretch", channels=1, intensity="none")


@pytest.fixture
def labelled_folder(tmp_path: Path) -> Path:
    """8 gray PNGs, 4 patients x 2 images, labels benign/malignant; returns the manifest."""
    rows = []
    for i in range(8):
        p = gray_png(tmp_path / f"img{i}.png", 10 * i)
        rows.append(
            {
                "path": p.name,
                "label": "malignant" if i % 2 else "benign",
                "patient_id": f"p{i // 2}",
                "scanner": f"s{i % 3}",
            }
        )
    return write_csv(tmp_path / "manifest.csv", rows)


@pytest.fixture(name="write_csv")
def _write_csv_fixture():  # type: ignore[no-untyped-def]
    """The helper itself: test modules cannot import conftest under --import-mode=importlib."""
    return write_csv


@pytest.fixture(name="gray_png")
def _gray_png_fixture():  # type: ignore[no-untyped-def]
    return gray_png
