"""Shared image conversion: any depth / colour / shape -> uint8 (C, size, size), and LoadedData.

Every source decodes to a numpy array in its native dtype and hands it here, so that a 16-bit
TIFF, a CT slice in HU and an 8-bit RGB JPEG all go through the same, tested steps in the same
order: drop alpha -> gray<->RGB -> intensity mapping to [0, 255] (float) -> resize -> one
rounding to uint8. Rounding once (not after each step) keeps the result exact where a test can
compute it by hand. Masks take the same geometry with nearest-neighbour, never interpolated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medfed.data.site import ArrayDataset
from medfed.data.sources.errors import DataError
from medfed.data.sources.options import ImageOptions, Intensity, ResizeMode

__all__ = ["ImageOptions", "LoadedData", "as_hwc", "convert_images", "convert_masks"]

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, what Pillow's convert("L") uses
_CHUNK = 256  # images resized per torch call: bounded memory for large MedMNIST arrays


def as_hwc(arr: np.ndarray, *, source: str) -> np.ndarray:
    """(H, W) or (H, W, C) of any numeric dtype -> float64 (H, W, 1 | 3); alpha dropped.

    Two channels are read as gray + alpha, four as RGBA; any other count has no meaning we can
    convert, so it is a DataError naming ``source``.
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DataError(f"{source}: expected a 2-D image, got an array of shape {arr.shape}")
    c = arr.shape[2]
    if c in (2, 4):
        arr = arr[:, :, : c - 1]
    elif c not in (1, 3):
        raise DataError(f"{source}: cannot make 1 or 3 channels from {c} (shape {arr.shape})")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"{source}: empty image of shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"{source}: pixel type {arr.dtype} is not numeric")
    out = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def _channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W, C) float -> (N, H, W, channels): gray repeated, or RGB -> BT.601 luma."""
    c = x.shape[-1]
    if c == channels:
        return x
    if channels == 3:
        return np.repeat(x, 3, axis=-1)
    return (x @ _LUMA)[..., None]


def _intensity(
    x: np.ndarray, opts: ImageOptions, display_range: tuple[float, float] | None
) -> np.ndarray:
    """(N, H, W, C) float -> the same in [0, 255]; per image (all channels share one scale)."""
    lo: np.ndarray | float
    hi: np.ndarray | float
    if opts.intensity == Intensity.WINDOW:
        assert opts.window is not None  # the options validator guarantees it
        center, width = opts.window
        lo, hi = center - width / 2.0, center + width / 2.0
    elif display_range is not None:
        lo, hi = display_range
    elif opts.intensity == Intensity.NONE:
        return np.clip(x, 0.0, 255.0)
    elif opts.intensity == Intensity.MINMAX:
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
    else:
        p = np.percentile(x.reshape(len(x), -1), list(opts.percentiles), axis=1)
        lo, hi = p[0][:, None, None, None], p[1][:, None, None, None]
    span = np.asarray(hi, dtype=np.float64) - lo
    scale = np.where(span > 0, 255.0 / np.where(span > 0, span, 1.0), 0.0)
    return np.clip((x - lo) * scale, 0.0, 255.0)


def _geometry(h: int, w: int, opts: ImageOptions) -> tuple[int, int]:
    """Size (h', w') to resize to before padding / cropping to a square of ``opts.size``."""
    s = opts.size
    if opts.resize == ResizeMode.STRETCH:
        return s, s
    scale = s / max(h, w) if opts.resize == ResizeMode.PAD else s / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _square(t: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size): center zero-pad or center crop, per side."""
    h, w = t.shape[-2:]
    out = t.new_zeros((*t.shape[:-2], size, size))
    sh, sw = min(h, size), min(w, size)
    ih, iw = (h - sh) // 2, (w - sw) // 2  # crop offsets in the input
    oh, ow = (size - sh) // 2, (size - sw) // 2  # pad offsets in the output
    out[..., oh : oh + sh, ow : ow + sw] = t[..., ih : ih + sh, iw : iw + sw]
    return out


def _resize(t: torch.Tensor, opts: ImageOptions, *, nearest: bool) -> torch.Tensor:
    h, w = int(t.shape[-2]), int(t.shape[-1])
    nh, nw = _geometry(h, w, opts)
    if (nh, nw) != (h, w):
        if nearest:
            t = F.interpolate(t, size=(nh, nw), mode="nearest-exact")
        else:
            t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True)  # fmt: skip
    return _square(t, opts.size)


def convert_images(
    pixels: np.ndarray | Sequence[np.ndarray],
    opts: ImageOptions,
    *,
    source: str,
    display_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Images of one shape, (N, H, W[, C]) or a list of (H, W[, C]) -> uint8 (N, C, size, size).

    ``display_range``: the (low, high) a decoder already mapped values into (a DICOM VOI window);
    it replaces per-image scaling, because re-stretching would undo the intended display.
    """
    frames = list(pixels)
    if not frames:
        return torch.zeros((0, opts.channels, opts.size, opts.size), dtype=torch.uint8)
    x = np.stack([as_hwc(np.asarray(f), source=source) for f in frames])
    x = _intensity(_channels(x, opts.channels), opts, display_range)
    parts = []
    for i in range(0, len(x), _CHUNK):
        t = torch.from_numpy(np.ascontiguousarray(x[i : i + _CHUNK].transpose(0, 3, 1, 2)))
        t = _resize(t.float(), opts, nearest=False)
        parts.append(t.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(parts)


def convert_masks(masks: np.ndarray, opts: ImageOptions, *, source: str) -> torch.Tensor:
    """Label maps (N, H, W) of small non-negative integers -> uint8 (N, size, size), nearest."""
    m = np.asarray(masks)
    if m.ndim == 4 and m.shape[-1] in (1, 3, 4):
        m = m[..., 0]  # a gray mask saved as RGB(A): the channels are equal
    if m.ndim != 3:
        raise DataError(f"{source}: a mask must be 2-D, got shape {m.shape[1:]}")
    if not np.issubdtype(m.dtype, np.number) and m.dtype != np.bool_:
        raise DataError(f"{source}: mask type {m.dtype} is not numeric")
    if m.size and (np.any(m < 0) or np.any(m > 255) or np.any(m != np.round(m))):
        raise DataError(f"{source}: mask values must be integers in [0, 255]")
    t = torch.from_numpy(np.ascontiguousarray(m.astype(np.uint8)))[:, None]
    return _resize(t, opts, nearest=True)[:, 0].contiguous()


@dataclass(frozen=True)
class LoadedData:
    """What every source produces: converted images plus everything needed to split them.

    ``images`` are uint8 (N, C, H, W), or (N, C, D, H, W) for whole volumes (NIfTI ``mode:
    volume``); ``masks`` are uint8 label maps of the images' spatial shape, (N, H, W) or
    (N, D, H, W). ``labels`` index ``label_names``; ``split`` holds "train" / "val" / "test" per
    case when the source had a split column; ``metadata`` holds other per-case columns (site,
    scanner, ...).
    """

    images: torch.Tensor  # uint8 (N, C, H, W) or (N, C, D, H, W)
    labels: torch.Tensor  # int64 (N,)
    case_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    label_names: tuple[str, ...]
    masks: torch.Tensor | None = None  # uint8 (N, H, W) or (N, D, H, W)
    split: tuple[str | None, ...] | None = None
    metadata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def label_map(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    def to_dataset(self) -> ArrayDataset:
        return ArrayDataset(self.images, self.labels, self.masks, self.case_ids)

    def subset(self, idx: np.ndarray | Sequence[int]) -> LoadedData:
        ix = [int(i) for i in np.asarray(idx, dtype=np.int64)]
        index = torch.as_tensor(ix, dtype=torch.int64)
        return LoadedData(
            images=self.images[index],
            labels=self.labels[index],
            case_ids=tuple(self.case_ids[i] for i in ix),
            patient_ids=tuple(self.patient_ids[i] for i in ix),
            label_names=self.label_names,
            masks=None if self.masks is None else self.masks[index],
            split=None if self.split is None else tuple(self.split[i] for i in ix),
            metadata={k: tuple(v[i] for i in ix) for k, v in self.metadata.items()},
            skipped=self.skipped,
            source=self.source,
        )

    def relabel(self, names: Sequence[str]) -> LoadedData:
        """The same data with labels re-indexed into ``names`` (a federation-wide class order)."""
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in self.label_names if n not in index]
        if missing:
            raise DataError(
                f"{self.source}: labels {missing} are not among the classes {list(names)}"
            )
        lut = torch.tensor([index[n] for n in self.label_names] or [0], dtype=torch.int64)
        labels = lut[self.labels] if len(self) else self.labels
        return LoadedData(self.images, labels, self.case_ids, self.patient_ids, tuple(names),
                          self.masks, self.split, self.metadata, self.skipped, self.source)  # fmt: skip
