"""NIfTI source: volumes listed in a CSV manifest, as 2-D slices or as whole 3-D volumes.

Volumes are reoriented to the closest canonical (RAS+) orientation first, so ``axis: 2`` means
axial at every site whatever the scanner wrote in the affine. The header's declared size is
checked against a memory cap and, for uncompressed files, against the file size before any voxel
is read, so a corrupt or hostile header fails as a DataError rather than an out-of-memory.

``mode: slices``: the slice is ``np.take(volume, k, axis)`` of that canonical array, converted
like any 2-D image (ImageOptions), with its mask slice.

``mode: volume``: one case per manifest row, ``np.moveaxis(volume, axis, 0)`` -> (D, H, W), so
``volume[d]`` is exactly slice ``d`` of slices mode. ImageOptions' intensity rule (minmax,
percentile, window, none) is applied once per *volume* (its statistics span every voxel), then
the volume is resampled to ``volume_size`` (trilinear, align_corners=False) and rounded once to
uint8, C = ``channels`` (gray, repeated for 3). Masks are resampled with nearest-neighbour
(``nearest-exact``: output voxel i samples input voxel floor((i + 0.5) * in / out)), so their
values stay exact labels. Images are uint8 (N, C, D, H, W), masks uint8 (N, D, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medfed.data.sources.errors import DataError
from medfed.data.sources.image import LoadedData, _intensity
from medfed.data.sources.options import ImageOptions, NiftiMode, NiftiSource, OnError
from medfed.data.sources.table import (
    RESERVED,
    Collector,
    Decoded,
    Record,
    assemble,
    manifest_records,
    read_manifest,
)

MAX_VOLUME_BYTES = 4 << 30
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_volume(path: Path) -> np.ndarray:
    """A NIfTI file as a 3-D array (scaled by scl_slope/inter), RAS+ oriented."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(path)
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise DataError(f"{path}: not a NIfTI image ({type(img).__name__})")
        shape = tuple(int(s) for s in img.header.get_data_shape())
        itemsize = np.dtype(img.header.get_data_dtype()).itemsize
        nbytes = int(np.prod(shape, dtype=np.float64)) * itemsize
        if nbytes > MAX_VOLUME_BYTES:
            raise DataError(
                f"{path}: header declares {shape} voxels ({nbytes} bytes), over the cap"
            )
        offset = int(getattr(img.dataobj, "offset", 0))  # the header field may read 0
        if not str(path).endswith(".gz") and offset + nbytes > path.stat().st_size:
            raise DataError(f"{path}: truncated (header declares {nbytes} voxel bytes)")
        img = nib.as_closest_canonical(img)
        vol = np.asarray(img.get_fdata(dtype=np.float32))
    except DataError:
        raise
    except Exception as err:  # ImageFileError, EOFError, zlib errors, bad affines...
        raise DataError(
            f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})"
        ) from None
    while vol.ndim > 3 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim == 2:
        vol = vol[:, :, None]
    if vol.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {vol.shape}")
    return vol


def slice_indices(n: int, spec: NiftiSource) -> list[int]:
    start, stop = spec.slice_range if spec.slice_range is not None else (0, n)
    return list(range(start, min(stop, n), spec.every_k))


def decode_nifti(rec: Record, spec: NiftiSource) -> Decoded:
    if rec.row is not None and rec.row.get("path") is None:
        raise DataError(f"{rec.row.at('path')}: empty path")
    vol = read_volume(rec.path)
    idx = slice_indices(vol.shape[spec.axis], spec)
    if not idx:
        raise DataError(f"{rec.path}: no slices in range {spec.slice_range} along axis "
                        f"{spec.axis} (size {vol.shape[spec.axis]})")  # fmt: skip
    frames = [np.take(vol, k, axis=spec.axis) for k in idx]
    masks = None
    if rec.mask_path is not None:
        mvol = read_volume(rec.mask_path)
        if mvol.shape != vol.shape:
            raise DataError(
                f"{rec.mask_path}: mask volume is {mvol.shape} but image is {vol.shape}"
            )
        masks = [np.rint(np.take(mvol, k, axis=spec.axis)) for k in idx]
    return Decoded(frames, [f"#{k}" for k in idx], masks=masks,
                   info={"dtype": "float32", "shape": "x".join(map(str, vol.shape))})  # fmt: skip


def convert_volume(
    vol: np.ndarray, opts: ImageOptions, size: tuple[int, int, int], *, source: str
) -> torch.Tensor:
    """A (D, H, W) volume of any numeric dtype -> uint8 (C, *size).

    Intensity mapping per volume, then trilinear resampling, then one rounding (the 2-D order).
    """
    if vol.ndim != 3 or 0 in vol.shape:
        raise DataError(f"{source}: expected a non-empty 3-D volume, got shape {vol.shape}")
    x = np.asarray(vol, dtype=np.float32)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    d, h, w = x.shape
    # _intensity scales each image over all its values, so a volume seen as one (D*H, W) image
    # gets the 2-D rule with statistics over the whole volume.
    x = _intensity(x.reshape(1, d * h, w, 1), opts, None).reshape(1, 1, d, h, w)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if (d, h, w) != tuple(size):
        t = F.interpolate(t, size=tuple(size), mode="trilinear", align_corners=False)
    t = t.round_().clamp_(0, 255).to(torch.uint8)[0]
    return t.expand(opts.channels, *t.shape[1:]).contiguous()


def convert_volume_mask(
    mask: np.ndarray, size: tuple[int, int, int], *, source: str
) -> torch.Tensor:
    """A (D, H, W) label volume -> uint8 (*size), nearest-neighbour; values must be 0..255."""
    m = np.rint(np.asarray(mask, dtype=np.float64))
    if m.size and (not np.isfinite(m).all() or m.min() < 0 or m.max() > 255):
        raise DataError(f"{source}: mask values must be integers in [0, 255]")
    t = torch.from_numpy(np.ascontiguousarray(m.astype(np.uint8)))[None, None]
    if tuple(t.shape[2:]) != tuple(size):
        t = F.interpolate(t, size=tuple(size), mode="nearest-exact")
    return t[0, 0].contiguous()


def decode_volume(
    rec: Record, spec: NiftiSource, image: ImageOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One manifest row's image (C, D, H, W) and mask (D, H, W) or None, converted."""
    if rec.row is not None and rec.row.get("path") is None:
        raise DataError(f"{rec.row.at('path')}: empty path")
    vol = read_volume(rec.path)
    mask = None
    if rec.mask_path is not None:
        mvol = read_volume(rec.mask_path)
        if mvol.shape != vol.shape:
            raise DataError(
                f"{rec.mask_path}: mask volume is {mvol.shape} but image is {vol.shape}"
            )
        mask = convert_volume_mask(np.moveaxis(mvol, spec.axis, 0), spec.volume_size,
                                   source=str(rec.mask_path))  # fmt: skip
    img = convert_volume(np.moveaxis(vol, spec.axis, 0), image, spec.volume_size,
                         source=str(rec.path))  # fmt: skip
    return img, mask


def assemble_volumes(
    records: Sequence[Record], spec: NiftiSource, *, image: ImageOptions, on_error: OnError
) -> LoadedData:
    """``table.assemble`` for whole volumes: the same on_error policy, labels, split and metadata
    (through the same Collector), but one (C, D, H, W) case per record instead of 2-D frames."""
    out = Collector(source=str(spec.manifest), on_error=on_error, classes=spec.classes)
    for rec in records:
        row = rec.row
        if row is None:  # pragma: no cover - manifest records always carry their row
            out.fail(rec.at, "no label for this file")
            continue
        try:
            img, mask = decode_volume(rec, spec, image)
        except DataError as err:
            out.fail(rec.at, str(err))
            continue
        label = out.check_label(row.get("label"), row, str(rec.path))
        if label is None:
            continue
        ok, split = out.check_split(row)
        if not ok:
            continue
        cid = row.get("path") or str(rec.path)
        out.images.append(img)
        out.masks.append(mask)
        out.labels.append(label)
        out.case_ids.append(cid)
        out.patients.append(row.get("patient_id") or cid)
        out.splits.append(split)
        out.meta.append({k: v for k, v in row.cells.items() if k not in RESERVED})
    return out.finish()


def load_nifti(
    spec: NiftiSource, *, image: ImageOptions, on_error: OnError = OnError.RAISE
) -> LoadedData:
    """Every listed volume, as slices or whole volumes (see the module docstring).

    Slices: case ids ``<path>#<slice>``, images (N, C, size, size); the patient is the volume's.
    Volume: case ids are the manifest paths, images (N, C, D, H, W) with (D, H, W) =
    ``spec.volume_size``, masks (N, D, H, W).
    """
    rows = read_manifest(spec.manifest, required=("path", "label"))
    root = spec.root if spec.root is not None else spec.manifest.parent
    records = manifest_records(rows, root)
    if spec.mode == NiftiMode.VOLUME:
        return assemble_volumes(records, spec, image=image, on_error=spec.on_error or on_error)
    return assemble(
        records,
        lambda rec: decode_nifti(rec, spec),
        image=image,
        on_error=spec.on_error or on_error,
        classes=spec.classes,
        source=str(spec.manifest),
        case_id=lambda rec, dec: (rec.row.get("path") if rec.row else None) or str(rec.path),
    )
