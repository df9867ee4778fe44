"""A synthetic federation written as a MedMNIST ``.npz``, so MedMNIST-style studies run offline.

Studies that carve one pooled public dataset into simulated sites (``data.files.pooled`` +
``partition``) are usually run on MedMNIST, which cannot be downloaded here or in CI. Writing the
built-in generators' images in MedMNIST's exact layout lets the same config, reader and partition
code run end to end on data that only differs in content:

* ``{train,val,test}_images``: uint8 (N, H, W) for grayscale, (N, H, W, 3) for RGB;
* ``{train,val,test}_labels``: uint8 (N, 1).

Train and val are the training sites' own train / val splits pooled (site identity is dropped, as
in MedMNIST, so a partitioner decides who holds what); test is the external hospital, so the
file's test split measures transfer to an unseen site rather than an i.i.d. hold-out. Masks are
dropped (MedMNIST has none). Images are made at the generator's size and downsampled with an
antialiasing filter, as MedMNIST's were from full-size scans, rather than rendered at 28 px.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfed.data.site import ArrayDataset, Federation
from medfed.data.synthetic.cache import write_npz

SPLITS = ("train", "val", "test")
MEDMNIST_SIZE = 28


def medmnist_images(images: torch.Tensor, *, size: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> MedMNIST's uint8 (N, size, size) (C = 1) or (N, size, size, 3)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    x = images
    if len(x) == 0:
        x = torch.zeros((0, images.shape[1], size, size), dtype=torch.uint8)
    elif tuple(x.shape[2:]) != (size, size):
        resized = F.interpolate(
            x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        x = resized.round_().clamp_(0, 255).to(torch.uint8)
    out = x.permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(out[..., 0] if out.shape[-1] == 1 else out)


def medmnist_arrays(fed: Federation, *, size: int = MEDMNIST_SIZE) -> dict[str, np.ndarray]:
    """The six MedMNIST arrays of ``fed`` (test empty when it has no external site)."""
    parts: dict[str, ArrayDataset] = {"train": fed.pooled_train(), "val": fed.pooled_val()}
    parts["test"] = fed.external.val if fed.external is not None else fed.pooled_val().subset([])
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        data = parts[split]
        if len(data) and int(data.labels.max()) > 255:
            raise ValueError(f"{split}: label {int(data.labels.max())} does not fit uint8")
        arrays[f"{split}_images"] = medmnist_images(data.images, size=size)
        arrays[f"{split}_labels"] = data.labels.numpy().astype(np.uint8).reshape(-1, 1)
    return arrays


def write_medmnist(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write atomically (a reader never sees half a file); refuses pickled object arrays."""
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")
               if f"{s}_{k}" not in arrays]  # fmt: skip
    if missing:
        raise ValueError(f"{path}: missing MedMNIST arrays {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write_npz(fh, arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
