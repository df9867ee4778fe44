"""NIfTI source: volumes listed in a CSV manifest, cut into 2-D slices (with their mask slices).

Volumes are reoriented to the closest canonical (RAS+) orientation first, so ``axis: 2`` means
axial at every site whatever the scanner wrote in the affine; the slice itself is
``np.take(volume, k, axis)`` of that canonical array. The header's declared size is checked
against a memory cap and, for uncompressed files, against the file size before any voxel is read,
so a corrupt or hostile header fails as a DataError rather than an out-of-memory.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medfed.data.sources.errors import DataError
from medfed.data.sources.image import LoadedData
from medfed.data.sources.options import ImageOptions, NiftiMode, NiftiSource, OnError
from medfed.data.sources.table import Decoded, Record, assemble, manifest_records, read_manifest

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


def load_nifti(
    spec: NiftiSource, *, image: ImageOptions, on_error: OnError = OnError.RAISE
) -> LoadedData:
    """Slices of every listed volume; case ids are ``<path>#<slice>``, patient = the volume's."""
    if spec.mode == NiftiMode.VOLUME:
        raise DataError(f"{spec.manifest}: mode 'volume': 3-D volumes need the segmentation "
                        "issue's 3-D dataset; use mode 'slices' for now")  # fmt: skip
    rows = read_manifest(spec.manifest, required=("path", "label"))
    root = spec.root if spec.root is not None else spec.manifest.parent
    return assemble(
        manifest_records(rows, root),
        lambda rec: decode_nifti(rec, spec),
        image=image,
        on_error=spec.on_error or on_error,
        classes=spec.classes,
        source=str(spec.manifest),
        case_id=lambda rec, dec: (rec.row.get("path") if rec.row else None) or str(rec.path),
    )
