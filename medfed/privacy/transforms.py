"""Update transforms: the privacy steps an update passes through on its way out of a site.

Each step is a small frozen object with one call, ``(update, ctx) -> update``; they compose with
:func:`chain` in the order the threat model needs: clip -> noise -> (encrypt). Nothing here knows
about rounds, runtimes or algorithms, so the same steps run in the simulator, under Flower, and in
the gradient-inversion audit (which attacks an update before and after them).

Clipping and noise act on the *change* an update makes to the global model (``w - w_global``, or
the delta itself for ``ParamKind.DELTA`` updates), over every floating-point tensor of the state:
a model's buffers (BatchNorm running statistics) are computed from patient images too, so leaving
them out would leave an unprotected channel. DP runs therefore replace BatchNorm by GroupNorm
(:func:`medfed.privacy.dp.make_private_model`), and all that is left is parameters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from medfed.types import ParamKind, Params, Update


@dataclass(frozen=True)
class TransformContext:
    """What a transform may use besides the update: the model it was trained from, and randomness."""

    global_params: Params
    generator: torch.Generator


class UpdateTransform(Protocol):
    def __call__(self, update: Update, ctx: TransformContext) -> Update: ...


def noise_generator(generator: torch.Generator, *, secure: bool) -> torch.Generator:
    """A fresh generator for noise: seeded from ``generator`` (reproducible research runs) or,
    with ``secure``, from the OS's entropy (deployments; nothing about it is reproducible)."""
    if secure:
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))


def delta_of(update: Update, global_params: Params) -> Params:
    """The floating-point change ``update`` makes to ``global_params`` (integer buffers dropped)."""
    out: Params = {}
    for key, value in update.params.items():
        if not value.is_floating_point():
            continue
        if update.kind is ParamKind.DELTA:
            out[key] = value
        else:
            out[key] = value - global_params[key].to(value.device)
    return out


def with_delta(update: Update, delta: Mapping[str, torch.Tensor], global_params: Params) -> Update:
    """``update`` with its floating-point change replaced by ``delta``, in the update's own kind."""
    params = dict(update.params)
    for key, d in delta.items():
        if update.kind is ParamKind.DELTA:
            params[key] = d.to(params[key].dtype)
        else:
            params[key] = (global_params[key].to(d.device) + d).to(params[key].dtype)
    return replace(update, params=params)


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors taken as one flat vector (float64 accumulation)."""
    if not tensors:
        return 0.0
    squares = [t.detach().double().pow(2).sum() for t in tensors.values()]
    return math.sqrt(float(torch.stack([s.to(squares[0].device) for s in squares]).sum()))


def clip_by_l2(delta: Mapping[str, torch.Tensor], clip: float) -> tuple[Params, float]:
    """Scale ``delta`` so its global L2 norm is at most ``clip``; also return the norm before.

    The factor is ``min(1, clip / norm)``, applied to every tensor, so the direction is kept.
    """
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    norm = l2_norm(delta)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    # A float32 product can land a hair above ``clip``; shrink by one ulp-scale margin.
    factor *= 1.0 - 1e-6 if factor < 1.0 else 1.0
    return {k: v * factor for k, v in delta.items()}, norm


def add_gaussian_noise(
    tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> Params:
    """``tensors`` plus i.i.d. N(0, std^2) noise on every element, drawn from ``generator``.

    Noise is drawn on the host (a ``torch.Generator`` is a CPU generator), in sorted-key order,
    so the same generator state gives the same noise whatever device the tensors live on.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    out: Params = {}
    for key in sorted(tensors):
        t = tensors[key]
        if std == 0:
            out[key] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
        out[key] = t + noise.to(device=t.device, dtype=t.dtype)
    return out


@dataclass(frozen=True)
class ClipL2:
    """Clip the update's change to L2 norm ``clip``; record the norm and whether it was clipped.

    ``dp_unclipped`` (1 or 0) is what adaptive clipping (Andrew et al. 2021) estimates its quantile
    from; the server only ever sees it summed and noised.
    """

    clip: float

    def __call__(self, update: Update, ctx: TransformContext) -> Update:
        delta, norm = clip_by_l2(delta_of(update, ctx.global_params), self.clip)
        out = with_delta(update, delta, ctx.global_params)
        metrics = dict(update.metrics) | {
            "dp_norm": norm,
            "dp_unclipped": float(norm <= self.clip),
        }
        return replace(out, metrics=metrics)


@dataclass(frozen=True)
class GaussianNoise:
    """Add N(0, std^2) to every element of the update's change."""

    std: float

    def __call__(self, update: Update, ctx: TransformContext) -> Update:
        noisy = add_gaussian_noise(delta_of(update, ctx.global_params), self.std, ctx.generator)
        return with_delta(update, noisy, ctx.global_params)


@dataclass(frozen=True)
class Chain:
    """Transforms applied left to right."""

    steps: tuple[UpdateTransform, ...]

    def __call__(self, update: Update, ctx: TransformContext) -> Update:
        for step in self.steps:
            update = step(update, ctx)
        return update


def chain(*steps: UpdateTransform) -> Chain:
    return Chain(tuple(steps))
