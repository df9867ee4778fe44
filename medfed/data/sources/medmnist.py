"""MedMNIST source: a local ``.npz`` in the medmnist package's layout. Nothing is downloaded.

The file holds ``{train,val,test}_images`` ((N, H, W) or (N, H, W, 3) uint8) and
``{train,val,test}_labels`` ((N, 1), or (N, k) for multi-label sets). The npz's own split becomes
the split column, so a federation built from it keeps MedMNIST's official train / val / test.
Multi-label sets need an explicit ``label_column``: silently taking column 0 would train on the
wrong task. Each image is its own case and patient (MedMNIST has no patient ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medfed.data.sources.errors import DataError
from medfed.data.sources.image import LoadedData, convert_images
from medfed.data.sources.options import ImageOptions, MedMnistSource, OnError, Split

_MAX_BYTES = 8 << 30


def read_npz(path: Path, splits: list[Split]) -> dict[Split, tuple[np.ndarray, np.ndarray]]:
    """(images, labels) per requested split, shapes checked; any failure names the file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for s in splits:
                for key in (f"{s}_images", f"{s}_labels"):
                    if key not in npz.files:
                        raise DataError(f"{path}: no array {key!r} (has: {', '.join(npz.files)})")
                out[s] = (npz[f"{s}_images"], npz[f"{s}_labels"])
    except DataError:
        raise
    except Exception as err:  # BadZipFile, truncated member, bad header, pickled object...
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    return out


def _check(path: Path, split: Split, images: np.ndarray, labels: np.ndarray) -> None:
    key = f"{path} array '{split}_images'"
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{key}: shape {images.shape} is not (N, H, W) or (N, H, W, 3); "
                        "3-D MedMNIST volumes need the 3-D dataset")  # fmt: skip
    if not np.issubdtype(images.dtype, np.number):
        raise DataError(f"{key}: dtype {images.dtype} is not numeric")
    if images.nbytes > _MAX_BYTES:
        raise DataError(f"{key}: {images.nbytes} bytes, over the cap")
    if labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
        raise DataError(f"{path} array '{split}_labels': shape {labels.shape} does not match "
                        f"{images.shape[0]} images")  # fmt: skip
    if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.floating):
        raise DataError(f"{path} array '{split}_labels': dtype {labels.dtype} is not numeric")


def _labels(path: Path, split: Split, labels: np.ndarray, column: int | None) -> np.ndarray:
    key = f"{path} array '{split}_labels'"
    if labels.ndim == 2:
        if column is not None:
            if column >= labels.shape[1]:
                raise DataError(f"{key}: label_column {column} but only {labels.shape[1]} columns")
            labels = labels[:, column]
        elif labels.shape[1] == 1:
            labels = labels[:, 0]
        else:
            raise DataError(f"{key}: multi-label ({labels.shape[1]} columns); choose one with "
                            "label_column")  # fmt: skip
    if labels.size and (not np.all(np.isfinite(labels)) or np.any(labels < 0)
                        or np.any(labels != np.round(labels))):  # fmt: skip
        raise DataError(f"{key}: labels must be non-negative integers")
    return labels.astype(np.int64)


def load_medmnist(
    spec: MedMnistSource, *, image: ImageOptions, on_error: OnError = OnError.RAISE
) -> LoadedData:
    """All images of the chosen splits; ``on_error`` has nothing to skip (one file), so any
    problem is a DataError."""
    arrays = read_npz(spec.path, list(spec.use))
    imgs, labels, splits, ids = [], [], [], []
    for s, (x, y) in arrays.items():
        _check(spec.path, s, x, y)
        labels.append(_labels(spec.path, s, y, spec.label_column))
        imgs.append(convert_images(x, image, source=f"{spec.path} array '{s}_images'"))
        splits += [str(s)] * len(x)
        ids += [f"{spec.path.stem}:{s}:{i}" for i in range(len(x))]
    y_all = torch.from_numpy(np.concatenate(labels))
    if not len(y_all):
        raise DataError(f"{spec.path}: no images in splits {[str(s) for s in spec.use]}")
    top = int(y_all.max())
    if spec.classes is not None and top >= len(spec.classes):
        raise DataError(f"{spec.path}: label {top} but only {len(spec.classes)} classes given")
    names = (
        tuple(spec.classes) if spec.classes is not None else tuple(str(i) for i in range(top + 1))
    )
    return LoadedData(
        images=torch.cat(imgs),
        labels=y_all,
        case_ids=tuple(ids),
        patient_ids=tuple(ids),
        label_names=names,
        split=tuple(splits),
        source=str(spec.path),
    )
