"""Macenko stain normalisation for H&E images (Macenko et al., ISBI 2009).

Why: haematoxylin and eosin vary between labs (dye batch, staining time, section thickness) and
between scanners, so the same tissue has a different colour at every hospital. A model trained on
one colour distribution falls over on another; normalising every image towards one *fixed*
reference stain removes most of that shift before a model ever sees the pixels.

Method (Beer-Lambert): optical density OD = -log(I / I0) is linear in the stain concentrations,
OD = S C with S the 3 x 2 stain matrix (one unit OD vector per stain). Macenko estimates S from
the image itself:

1. OD per pixel; drop transparent pixels (|OD| < ``beta``): glass carries no stain.
2. The two principal eigenvectors of the OD covariance span the stain plane.
3. Project onto that plane; the ``alpha``-th and ``(100 - alpha)``-th percentiles of the angle
   are the two extreme (purest) stain directions - robust versions of the min / max angle.
4. Haematoxylin is the one with the larger red OD (it absorbs red: nuclei look blue-purple).
5. Concentrations by least squares; their 99th percentiles are the "maximum" concentrations,
   which are rescaled to the reference ones before re-rendering with the reference matrix.

One deliberate departure from the common ports: a pixel counts as transparent when the *norm* of
its OD is below ``beta``, not when *any* channel is. Eosin barely absorbs red and blue (Ruifrok's
eosin: 0.07 and 0.11 OD per unit), so the any-channel test throws away nearly every pure-eosin
pixel and the eosin direction ends up estimated from mixed pixels (15-20 degrees off on synthetic
tiles, against 1-5 with the norm).

Federated use (``HistologyOptions.stain_normalize``): every site runs this on its own tiles only,
towards the module constants ``REFERENCE_STAIN_MATRIX``, ``REFERENCE_MAX_CONC`` and
``REFERENCE_IO``. Because the target is a published constant, all sites land in the same colour
space without exchanging any pixels or statistics - pooling stain statistics across sites would
leak site information and would not help a hospital that joins (or is evaluated) later.

Degenerate input (a nearly blank tile, or tissue with a single stain such as pure stroma) has no
stable second stain direction: ``macenko_stain_matrix`` raises ``StainEstimationError`` there, and
``macenko_normalize`` returns such images unchanged - leaving an image as it is can only fail to
correct it, while mapping it through a guessed matrix can invent colour that was never there.

Layout: images are RGB uint8, channel-first like everything in medfed: (3, H, W) or (N, 3, H, W).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "REFERENCE_IO",
    "REFERENCE_MAX_CONC",
    "REFERENCE_STAIN_MATRIX",
    "RUIFROK_E",
    "RUIFROK_H",
    "StainEstimationError",
    "concentrations",
    "estimate_io",
    "macenko_normalize",
    "macenko_stain_matrix",
    "optical_density",
    "render_stains",
]

#: Ruifrok & Johnston (2001) OD vectors of haematoxylin and eosin (normalised below).
RUIFROK_H: tuple[float, float, float] = (0.65, 0.70, 0.29)
RUIFROK_E: tuple[float, float, float] = (0.07, 0.99, 0.11)


def _unit(v: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


#: The fixed target of normalisation: columns (H, E), unit OD vectors (the canonical Ruifrok
#: stains, which the synthetic histology's reference-stained sites are rendered with).
REFERENCE_STAIN_MATRIX: np.ndarray = np.stack([_unit(RUIFROK_H), _unit(RUIFROK_E)], axis=1)
REFERENCE_STAIN_MATRIX.setflags(write=False)
#: 99th-percentile (H, E) concentrations that a normalised image's strongest nuclei and stroma
#: are mapped to: what this module measures on 600 synthetic tiles stained exactly with the
#: reference matrix (I0 = 240) and scanned through a typical chain (blur 0.3 px, JPEG 90). Measured
#: through a scanner, not on ideal pixels, because every real input has been through one too.
REFERENCE_MAX_CONC: tuple[float, float] = (1.50, 0.75)
#: Glass intensity of the reference: normalised images are re-rendered at this I0.
REFERENCE_IO = 240.0

#: Fewer stained pixels than this (per estimate) and the covariance is noise: degenerate.
MIN_TISSUE_PIXELS = 64
#: Two estimated stain directions closer than this (degrees) cannot be told apart: degenerate.
MIN_STAIN_ANGLE_DEG = 4.0
#: Stain estimation looks at most this many pixels (an even stride through the batch): the
#: covariance and the angle percentiles are settled long before, and big batches stay fast.
MAX_ESTIMATION_PIXELS = 1 << 19

ImageT = TypeVar("ImageT", np.ndarray, torch.Tensor)


class StainEstimationError(ValueError):
    """The image holds too little (or too one-sided) stain to estimate two stain vectors."""


def _as_numpy(images: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim not in (3, 4) or arr.shape[-3] != 3:
        raise ValueError(f"expected RGB images (3, H, W) or (N, 3, H, W), got {arr.shape}")
    return arr


def estimate_io(images: np.ndarray | torch.Tensor, *, percentile: float = 99.0) -> float:
    """The glass (white) level I0 of a batch: a high percentile of per-pixel mean intensity.

    Scanners differ in white level (240-255), and an I0 that is off shifts every pixel's OD by
    the same grey vector, which is not in the stain plane and so skews both the estimated stain
    directions and the concentrations. Any batch with some glass or gland lumen in it has its
    brightest percent of pixels at the glass level (sensor noise averaged over the channels).
    Clipped to [200, 255]; a batch without any bright pixel gets 200.
    """
    arr = _as_numpy(images)
    level = float(np.percentile(arr.mean(axis=-3, dtype=np.float32), percentile))
    return min(max(level, 200.0), 255.0)


def optical_density(images: np.ndarray | torch.Tensor, *, io: float = 240.0) -> np.ndarray:
    """OD = -log(I / io) per channel (float32, same layout as the input).

    Intensities are floored at 1 (log 0), not offset by +1 as some ports do: the offset biases
    every pixel's OD, the floor only the (meaningless) zero-intensity ones.
    """
    arr = _as_numpy(images).astype(np.float32)
    np.maximum(arr, 1.0, out=arr)
    arr *= np.float32(1.0 / io)
    np.log(arr, out=arr)
    np.negative(arr, out=arr)
    return arr


def _channels(od: np.ndarray, limit: int | None = None) -> np.ndarray:
    """(3, P) channel rows of (3, H, W) or (N, 3, H, W) OD; at most ``limit`` pixels (stride)."""
    rows = np.moveaxis(od.reshape(-1, 3, od.shape[-2] * od.shape[-1]), 1, 0).reshape(3, -1)
    if limit is not None and rows.shape[1] > limit:
        rows = rows[:, :: -(-rows.shape[1] // limit)]
    return rows


def _estimate(od: np.ndarray, *, alpha: float, beta: float) -> np.ndarray:
    """Macenko's stain matrix from (3, P) OD channel rows."""
    tissue = od[:, np.einsum("cp,cp->p", od, od) >= beta * beta]
    if tissue.shape[1] < MIN_TISSUE_PIXELS:
        raise StainEstimationError(
            f"{tissue.shape[1]} stained pixels (|OD| >= {beta}), need {MIN_TISSUE_PIXELS}"
        )
    _, vecs = np.linalg.eigh(np.cov(tissue))  # ascending eigenvalues
    plane = vecs[:, [2, 1]]  # principal first
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # OD is positive: so is the principal axis
    proj = plane.T.astype(np.float32) @ tissue
    phi = np.arctan2(proj[1], proj[0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    if np.degrees(hi - lo) < MIN_STAIN_ANGLE_DEG:
        raise StainEstimationError(
            f"stain directions only {np.degrees(hi - lo):.1f} degrees apart: one stain only"
        )
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    h, e = (v_lo, v_hi) if v_lo[0] > v_hi[0] else (v_hi, v_lo)  # H absorbs more red
    h, e = h * np.sign(h.sum()), e * np.sign(e.sum())
    return np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)], axis=1)


def macenko_stain_matrix(
    images: np.ndarray | torch.Tensor,
    *,
    io: float = 240.0,
    alpha: float = 1.0,
    beta: float = 0.15,
) -> np.ndarray:
    """Estimate the (3, 2) stain matrix (columns H, E: unit OD vectors) of RGB uint8 images.

    ``images`` is one image (3, H, W) or a batch (N, 3, H, W); a batch gives one pooled estimate
    (more pixels, and a tile with no nuclei still contributes its eosin). ``io`` is the intensity
    of glass, ``alpha`` the angle percentile (robust extremes), ``beta`` the transparency cut-off
    on |OD|. Raises ``StainEstimationError`` for degenerate input (see the module docstring).
    """
    od = optical_density(images, io=io)
    return _estimate(_channels(od, MAX_ESTIMATION_PIXELS), alpha=alpha, beta=beta)


def concentrations(od: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations: OD (..., 3, H, W) -> (..., 2, H, W), float32."""
    pinv = np.linalg.pinv(np.asarray(stain_matrix, dtype=np.float64)).astype(np.float32)
    flat = od.reshape(-1, 3, od.shape[-2] * od.shape[-1])
    return np.matmul(pinv, flat).reshape(*od.shape[:-3], 2, *od.shape[-2:])


def render_stains(conc: np.ndarray, stain_matrix: np.ndarray, *, io: float = 240.0) -> np.ndarray:
    """Beer-Lambert: concentrations (..., 2, H, W) -> intensities io exp(-S c) (..., 3, H, W)."""
    flat = conc.reshape(-1, 2, conc.shape[-2] * conc.shape[-1])
    od = np.matmul(np.asarray(stain_matrix, dtype=np.float32), flat.astype(np.float32))
    return (np.float32(io) * np.exp(-od)).reshape(*conc.shape[:-3], 3, *conc.shape[-2:])


def _normalize_one(
    arr: np.ndarray,
    *,
    target: np.ndarray,
    target_max: np.ndarray,
    io: float,
    target_io: float,
    alpha: float,
    beta: float,
) -> np.ndarray:
    """Normalise one group of images (pooled estimate); degenerate groups come back unchanged."""
    od = optical_density(arr, io=io)
    sample = _channels(od, MAX_ESTIMATION_PIXELS)
    try:
        matrix = _estimate(sample, alpha=alpha, beta=beta)
    except StainEstimationError:
        return arr.copy()
    pinv = np.linalg.pinv(matrix)
    max_conc = np.percentile(pinv.astype(np.float32) @ sample, 99, axis=1)
    if (max_conc <= 1e-3).any():  # a stain present in direction but not in amount
        return arr.copy()
    # The whole mapping is linear in OD: concentrations (pinv), rescaled maxima, target stains.
    remap = (target * (target_max / max_conc)[None, :]) @ pinv  # (3, 3)
    out = np.matmul(remap.astype(np.float32), od.reshape(-1, 3, od.shape[-2] * od.shape[-1]))
    np.negative(out, out=out)
    np.exp(out, out=out)
    out *= np.float32(target_io)
    np.rint(out, out=out)
    return np.clip(out, 0, 255).astype(np.uint8).reshape(arr.shape)


def macenko_normalize(
    images: ImageT,
    *,
    target_matrix: np.ndarray = REFERENCE_STAIN_MATRIX,
    target_max_conc: tuple[float, float] | np.ndarray = REFERENCE_MAX_CONC,
    io: float = 240.0,
    target_io: float | None = None,
    alpha: float = 1.0,
    beta: float = 0.15,
    per_image: bool = False,
) -> ImageT:
    """Re-render RGB uint8 images with the target stains: same shape, dtype and kind (numpy/torch).

    ``per_image=False`` (default) estimates one stain matrix and one pair of maximum
    concentrations from the whole batch - what a site does with its own tiles: one lab, one
    scanner, and enough pixels that a tile without nuclei is no problem. ``per_image=True``
    estimates each image on its own (slide-level variation), at the price that one-stain images
    are degenerate and left unchanged. Degenerate input is returned unchanged, never an error.

    ``io`` is the glass level of the input (``estimate_io`` measures it), ``target_io`` the one
    of the output (default: the same, so only the stains change).
    """
    arr = _as_numpy(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {arr.dtype}")
    target = np.asarray(target_matrix, dtype=np.float64)
    if target.shape != (3, 2):
        raise ValueError(f"target_matrix must be (3, 2), got {target.shape}")
    tmax = np.asarray(target_max_conc, dtype=np.float64)
    out_io = io if target_io is None else target_io

    def one(group: np.ndarray) -> np.ndarray:
        return _normalize_one(group, target=target, target_max=tmax, io=io, target_io=out_io,
                              alpha=alpha, beta=beta)  # fmt: skip

    if per_image and arr.ndim == 4:
        out = np.stack([one(im) for im in arr]) if len(arr) else arr.copy()
    else:
        out = one(arr)
    if isinstance(images, torch.Tensor):
        return torch.from_numpy(out).to(images.device)
    return out
