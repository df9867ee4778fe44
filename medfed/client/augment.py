"""Training-time augmentation: how a site's model learns what other hospitals' images look like.

A model trained at one hospital learns that hospital's scanner as much as its patients: gain,
log-compression curve, speckle grain, display blur, export resolution and framing. ``flip`` only
mirrors the image. ``acquisition`` also redraws those scanner and export settings per image
(gamma, contrast and brightness, a resolution loss, a Gaussian blur, a zoom and shift), so a model
that never sees another site's images still sees their variety. It matters most where no weights
are exchanged during training - local-only models and one-shot FL's teachers - and helps
federated and centralized training too (benchmarks/README.md).

Every draw comes from the training generator, so a run is reproducible; images are transformed on
their device in [0, 1] before normalisation. The geometric part moves a segmentation mask with its
image; the photometric part never touches the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F


class Augment(StrEnum):
    NONE = "none"
    FLIP = "flip"  # horizontal mirror, p = 0.5
    ACQUISITION = "acquisition"  # flip plus scanner/export variation (AcquisitionShift)


@dataclass(frozen=True)
class AcquisitionShift:
    """The ranges of the ``acquisition`` policy; every draw is per image unless noted.

    The defaults span the default thyroid federation's scanners (gamma 0.8-1.2, dynamic range
    42-60 dB, blur up to 0.8 px at 64 px, exports down to half resolution).
    """

    log_gamma: float = 0.4  # gamma = exp(U(-a, a))
    log_contrast: float = 0.3  # contrast about the image mean = exp(U(-a, a))
    brightness: float = 0.1  # additive, U(-a, a), on [0, 1]
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.0)  # pixels
    p_resample: float = 0.3
    resample_scale: tuple[float, float] = (0.5, 1.0)  # one factor per batch: down, then up again
    zoom: float = 0.15  # field of view shrinks by up to this share
    shift: float = 0.1  # translation, a share of the half-width

    def __post_init__(self) -> None:
        if not (0 < self.resample_scale[0] <= self.resample_scale[1] <= 1):
            raise ValueError(f"resample_scale must lie in (0, 1], got {self.resample_scale}")
        if not (0 < self.blur_sigma[0] <= self.blur_sigma[1]):
            raise ValueError(f"blur_sigma must be positive and ordered, got {self.blur_sigma}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, as a grouped convolution."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps**2)[None, :] / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    k = kernel.shape[1]
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"),
                    kernel.view(b * c, 1, 1, k), groups=b * c)  # fmt: skip
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"),
                    kernel.view(b * c, 1, k, 1), groups=b * c)  # fmt: skip
    return flat.view(b, c, h, w)


def acquisition_shift(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
    shift: AcquisitionShift = AcquisitionShift(),  # noqa: B008 - frozen, shared safely
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Redraw scanner settings for a (B, C, H, W) batch in [0, 1]; the mask (B, H, W) moves along.

    Parameters are drawn on the CPU from ``generator`` (the same stream on every device), the
    pixels are transformed where they are.
    """
    if x.ndim != 4:
        raise ValueError(
            f"train.augment 'acquisition' transforms 2-D images (B, C, H, W); got shape "
            f"{tuple(x.shape)} (use 'flip' for volumes)"
        )
    b, dev, dt = x.shape[0], x.device, x.dtype

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=dev, dtype=dt).view(b, 1, 1, 1)

    def chosen(on: torch.Tensor) -> torch.Tensor:
        return on.to(dev).view(b, 1, 1, 1)

    gamma = per_image(torch.exp(_uniform(b, -shift.log_gamma, shift.log_gamma, generator)))
    contrast = per_image(torch.exp(_uniform(b, -shift.log_contrast, shift.log_contrast, generator)))
    bright = per_image(_uniform(b, -shift.brightness, shift.brightness, generator))
    blur_on = torch.rand(b, generator=generator) < shift.p_blur
    sigma = _uniform(b, *shift.blur_sigma, generator)
    resample_on = torch.rand(b, generator=generator) < shift.p_resample
    factor = float(_uniform(1, *shift.resample_scale, generator))
    zoom = 1.0 - shift.zoom * torch.rand(b, generator=generator)
    offset = _uniform(2 * b, -shift.shift, shift.shift, generator).view(b, 2)

    x = x.clamp_min(1e-6) ** gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + bright).clamp_(0.0, 1.0)
    h, w = x.shape[-2:]
    if bool(resample_on.any()) and factor < 1.0:
        size = (max(4, round(h * factor)), max(4, round(w * factor)))
        low = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        back = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        x = torch.where(chosen(resample_on), back, x)
    if bool(blur_on.any()):
        blurred = _blur(x, torch.where(blur_on, sigma, torch.full_like(sigma, 1e-3)).to(dev, dt))
        x = torch.where(chosen(blur_on), blurred, x)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = zoom
    theta[:, 1, 1] = zoom
    theta[:, :, 2] = offset
    grid = F.affine_grid(theta.to(dev, dt), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mask is not None:
        moved = F.grid_sample(mask[:, None].to(dt), grid, mode="nearest",
                              padding_mode="border", align_corners=False)  # fmt: skip
        mask = moved[:, 0].round().to(mask.dtype)
    return x, mask
