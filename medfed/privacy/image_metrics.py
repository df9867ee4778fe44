"""Image similarity for the gradient-inversion audit: SSIM, PSNR and optimal batch matching.

Both metrics take images with pixel values in [0, 1] (``data_range`` 1) and follow the reference
definitions exactly, so a score here equals scikit-image's to float precision:

* SSIM (Wang et al. 2004): Gaussian window of sigma 1.5 truncated at 3.5 sigma (11 x 11),
  K1 = 0.01, K2 = 0.03, population (not sample) covariances, and the mean of the SSIM map over
  the pixels whose window lies wholly inside the image - what
  ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0)`` computes. A multi-channel image (C, H, W) scores
  the mean over channels, like scikit-image with ``channel_axis=0``.
* PSNR: ``10 log10(1 / MSE)``; identical images score ``inf``.

A batch update mixes its images, so a reconstruction of image i need not come out at index i.
:func:`match` pairs originals with reconstructions by the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) on the negative SSIM matrix: the pairing with the
highest total SSIM, i.e. the most favourable reading of the attack - an audit should err on the
side of the attacker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ["SSIM_SIGMA", "ImageScore", "match", "psnr", "score", "ssim", "ssim_matrix"]

SSIM_SIGMA = 1.5
_TRUNCATE = 3.5  # scipy.ndimage.gaussian_filter's default, which scikit-image uses
_K1, _K2 = 0.01, 0.03


@dataclass(frozen=True)
class ImageScore:
    """One original/reconstruction pair after matching: ``recon_index`` is the matched recon."""

    index: int
    recon_index: int
    ssim: float
    psnr: float

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "index": self.index,
            "recon_index": self.recon_index,
            "ssim": self.ssim,
            # JSON has no infinity: a perfect reconstruction's PSNR is written as null.
            "psnr": self.psnr if math.isfinite(self.psnr) else None,
        }


def _gaussian_kernel(sigma: float, dtype: torch.dtype) -> torch.Tensor:
    radius = int(_TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (1, 1, H, W); (C, H, W) -> (1, C, H, W); (B, C, H, W) unchanged; float64."""
    x = torch.as_tensor(x)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    elif x.ndim != 4:
        raise ValueError(f"expected (H, W), (C, H, W) or (B, C, H, W), got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _ssim_per_image(a: torch.Tensor, b: torch.Tensor, *, data_range: float) -> torch.Tensor:
    """Mean SSIM of each (B, C, H, W) pair over channels and valid pixels: shape (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    k = _gaussian_kernel(SSIM_SIGMA, a.dtype).to(a.device)
    if min(a.shape[-2:]) < k.numel():
        raise ValueError(
            f"SSIM needs images of at least {k.numel()} x {k.numel()} pixels, got "
            f"{tuple(a.shape[-2:])}"
        )
    n, c = a.shape[:2]
    # All five moments filtered at once, channels folded into the batch; a separable
    # 'valid' convolution gives exactly scikit-image's map cropped by the window radius.
    stack = torch.stack([a, b, a * a, b * b, a * b], dim=2).reshape(n * c * 5, 1, *a.shape[-2:])
    f = F.conv2d(stack, k.view(1, 1, 1, -1))
    f = F.conv2d(f, k.view(1, 1, -1, 1))
    ux, uy, uxx, uyy, uxy = f.reshape(n, c, 5, *f.shape[-2:]).unbind(dim=2)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> float:
    """SSIM of one image pair, (H, W) or (C, H, W) (see the module docstring)."""
    a4, b4 = _as_batch(a), _as_batch(b)
    if a4.shape[0] != 1:
        raise ValueError("ssim scores one image pair; use ssim_matrix for batches")
    return float(_ssim_per_image(a4, b4, data_range=data_range)[0])


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of one image pair; ``inf`` when they are identical."""
    a64, b64 = _as_batch(a), _as_batch(b)
    if a64.shape != b64.shape:
        raise ValueError(f"images differ in shape: {tuple(a64.shape)} vs {tuple(b64.shape)}")
    mse = float(torch.mean((a64 - b64) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim_matrix(
    originals: torch.Tensor, recons: torch.Tensor, *, data_range: float = 1.0
) -> np.ndarray:
    """``S[i, j]`` = SSIM(originals[i], recons[j]) for two (B, C, H, W) batches."""
    a, b = _as_batch(originals), _as_batch(recons)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    na, nb = a.shape[0], b.shape[0]
    pairs_a = a.repeat_interleave(nb, dim=0)
    pairs_b = b.repeat(na, 1, 1, 1)
    return _ssim_per_image(pairs_a, pairs_b, data_range=data_range).reshape(na, nb).cpu().numpy()


def match(originals: torch.Tensor, recons: torch.Tensor) -> list[int]:
    """For each original, the index of its reconstruction: the assignment of maximal total SSIM.

    Hungarian algorithm on ``-SSIM``; both batches must have the same size.
    """
    if _as_batch(originals).shape[0] != _as_batch(recons).shape[0]:
        raise ValueError("match needs as many reconstructions as originals")
    rows, cols = linear_sum_assignment(-ssim_matrix(originals, recons))
    order = [0] * len(rows)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        order[r] = c
    return order


def score(original: torch.Tensor, recon: torch.Tensor) -> list[ImageScore]:
    """Per-image SSIM and PSNR of ``recon`` against ``original`` (both (B, C, H, W) in [0, 1])
    after optimal matching (:func:`match`), in the order of the originals."""
    a, b = _as_batch(original), _as_batch(recon)
    order = match(a, b)
    return [
        ImageScore(index=i, recon_index=j, ssim=ssim(a[i], b[j]), psnr=psnr(a[i], b[j]))
        for i, j in enumerate(order)
    ]
