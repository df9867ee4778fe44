"""Gradient inversion: what an honest-but-curious server can see of a site's images in one update.

The threat: the server knows the global model it sent, receives one site's update - the gradient
of one batch, or the weight delta of one local SGD step on it - and tries to recover the batch.

* **Labels** (iDLG, Zhao et al. 2020): with cross-entropy and a final linear layer fed by
  non-negative features (ReLU, pooling), the gradient of the classifier's weight row c is
  ``sum_i (p_ic - y_ic) h_i``: for one image the true class's row is the only one pointing
  negative. For batches, LLG (Wainakh et al. 2022) counts labels: every class with a negative
  row sum is present, and the remaining slots go one at a time to the class whose row sum is most
  negative after each found instance's mean share has been given back.
* **Images** (Inverting Gradients, Geiping et al. 2020): optimise dummy images so the gradient
  they produce (with the inferred labels) points the same way as the observed one - loss
  ``1 - cos(grad(x), target)`` over all parameters as one vector - plus a total-variation prior;
  Adam on the *signs* of the pixel gradients, step decay at 3/8, 5/8 and 7/8 of each stage, the
  pixels boxed to [0, 1], and several random restarts of which the lowest final loss wins.
  One addition: a coarse-to-fine pyramid (``AttackOptions.pyramid``). The image is optimised at
  1/8, 1/4, 1/2, then full size (bilinear upsampling inside the forward pass), the step size
  doubled per coarser level. At full resolution alone the attack falls into speckle-like local
  minima; the pyramid finds the anatomy first (measured, trained GroupNorm CNN at 64 px, same
  budget: SSIM 0.08 -> 0.25; doubling the coarse steps: mean 0.17 -> 0.24 over four seeds).

What it can and cannot do (measured on the synthetic thyroid data, batch 1, default options):
how much leaks depends on the architecture more than on the attack. On ``tinycnn`` (conv, conv,
then a linear classifier over the whole spatial feature map) the classifier's gradient holds the
last feature map itself, and the attack recovers the image, speckle included: SSIM 0.71 at 64 px
(``configs/audit-thyroid.yaml``), 0.62-0.76 at 32 px with a 600-step budget, and 0.06 or less
from the DP update. On ``smallcnn_gn`` (the form DP runs train: BatchNorm -> GroupNorm), whose
classifier sees only globally pooled features, it recovers the anatomy -
nodule, vessel, shadow, the dark banner - at SSIM 0.23-0.29 (64 px, new or trained model), and
0.04 or less from the DP update. The speckle is not recovered, and SSIM counts it: the original
blurred by a 2 px Gaussian, all anatomy and no speckle, scores about 0.4. On ``smallcnn`` with
BatchNorm it fails (SSIM < 0.05 without DP): a site trains in train mode, where BatchNorm on one
image normalises each channel over its own few pixels (4 x 4 at the last block of a 64 px
image), and the gradient becomes a chaotic function of the pixels. That is a weakness of this
attack, not a privacy guarantee (the running statistics a BatchNorm update carries leak
per-channel moments, and other attacks exist); DP's bound holds for every attack.

Faithfulness choices:

* Pixels are reconstructed in [0, 1] and pass through the *training* normalisation
  (:func:`model_input`, the differentiable twin of ``medfed.client.train.to_input``) inside the
  attacked forward pass, so the attacker optimises exactly what a site feeds its network. The TV
  prior acts on that network input: with ``per_image`` normalisation the forward pass cannot see
  an image's brightness or contrast, and a prior on raw pixels would shrink the contrast to zero.
* A site computes its update in train mode, so both the true update (:func:`client_update`) and
  the attacker's forward run in train mode (BatchNorm normalises with batch statistics) on a
  private copy of the model: the running statistics they update are thrown away.
* A weight delta is supported for ONE local step of SGD with learning rate ``lr`` (the first step
  of momentum SGD is the same step): ``delta = -lr * grad``, so ``grad = -delta / lr``. Cosine
  matching does not even need ``lr``, only the sign. Several local steps mix gradients at
  different weights; inverting them is not implemented. Augmentation (random flips) is not
  applied to the attacked batch: a flipped image is the same patient image.
* :func:`privatize` applies a site's local DP step to the update: clip to L2 norm ``C``, add
  N(0, (sigma C)^2) to every coordinate (:mod:`medfed.privacy.transforms`).

Scoring: with ``per_image`` normalisation the update carries no information on an image's mean
and standard deviation, so :func:`score_space` compares the z-scored images, both mapped to
[0, 1] by the original's z-score range (the original becomes its min-max stretch). With ``fixed``
normalisation pixels are identifiable and are compared as they are.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from medfed.client.train import PIXEL_MEAN, PIXEL_STD
from medfed.privacy.image_metrics import ImageScore, score
from medfed.privacy.transforms import add_gaussian_noise, clip_by_l2
from medfed.types import StrEnum

__all__ = [
    "AttackOptions",
    "AttackResult",
    "ImageScore",
    "Normalize",
    "UpdateKind",
    "as_gradient",
    "as_pixels",
    "attack",
    "classifier_weight",
    "client_update",
    "infer_labels",
    "model_input",
    "privatize",
    "pyramid_sizes",
    "reconstruct",
    "score",
    "score_space",
    "trainable_names",
]

Normalize = Literal["per_image", "fixed"]
StepCallback = Callable[[int], None]


class UpdateKind(StrEnum):
    """What a site sends: the batch gradient, or the weight change of one local SGD step."""

    GRADIENT = "gradient"
    DELTA = "delta"


class AttackOptions(BaseModel):
    """Options of the gradient-inversion attack and of the DP setting it is run against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(2000, ge=1, description="optimiser steps per restart")
    lr: float = Field(0.1, gt=0, description="Adam step size on the pixels (signed gradients)")
    tv_weight: float = Field(
        1e-2, ge=0, description="total-variation prior weight (on the network input)"
    )
    restarts: int = Field(2, ge=1, description="random initialisations; the best final loss wins")
    pyramid: int = Field(
        4,
        ge=1,
        le=8,
        description="coarse-to-fine levels: optimise at 1/2^(k-1) of the size first (not below "
        "8 px), then double (iterations split evenly over the levels); 1 = full size only",
    )
    batch_size: int = Field(1, ge=1, le=8, description="images in the attacked update")
    update: UpdateKind = Field(UpdateKind.GRADIENT, description="gradient or one-step delta")
    update_lr: float | None = Field(
        None, gt=0, description="SGD learning rate of the one-step delta; None: the run's train.lr"
    )
    seed: int = Field(0, ge=0, description="batch choice, DP noise and attack initialisations")
    dp_clip: float = Field(1.0, gt=0, description="DP clipping norm C")
    dp_noise_multiplier: float = Field(
        1.0, ge=0, description="DP noise multiplier sigma (noise std sigma * C per coordinate)"
    )
    device: str = Field("auto", description="auto, cpu or cuda[:N]")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in {"auto", "cpu"} and not v.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {v!r}")
        return v


@dataclass(frozen=True)
class AttackResult:
    """Inferred labels, reconstructed pixels in [0, 1] (B, C, H, W, on the host), final loss."""

    labels: list[int]
    images: torch.Tensor
    loss: float
    seconds: float


# --------------------------------------------------------------------------------------------
# What a site sends


def model_input(pixels: torch.Tensor, normalize: Normalize | str) -> torch.Tensor:
    """Pixels in [0, 1] (B, C, H, W) -> the normalised network input, differentiably.

    The same arithmetic as :func:`medfed.client.train.to_input` (unbiased std, floor 1/255).
    """
    if normalize == "per_image":
        dims = tuple(range(1, pixels.ndim))
        mean = pixels.mean(dim=dims, keepdim=True)
        std = pixels.std(dim=dims, keepdim=True).clamp_min(1.0 / 255.0)
        return (pixels - mean) / std
    if normalize == "fixed":
        return (pixels - PIXEL_MEAN) / PIXEL_STD
    raise ValueError(f"normalize must be 'per_image' or 'fixed', got {normalize!r}")


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float pixels in [0, 1]; float images are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters an update carries (those that require grad), in model order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _site_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A train-mode copy: BatchNorm uses batch statistics, and its running stats go nowhere."""
    clone = copy.deepcopy(model).to(device)
    clone.train()
    return clone


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def client_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: UpdateKind = UpdateKind.GRADIENT,
    lr: float = 0.05,
    normalize: Normalize | str = "per_image",
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The update a site sends for one batch: the mean cross-entropy gradient, or ``-lr * grad``.

    ``images`` are uint8 or [0, 1] float (B, C, H, W). ``model`` itself is left untouched.
    """
    dev = torch.device(device)
    site = _site_copy(model, dev)
    x = model_input(as_pixels(images).to(dev), normalize)
    try:
        logits = site(x)
    except ValueError as err:
        if "more than 1 value per channel" not in str(err):
            raise
        raise ValueError(
            f"BatchNorm cannot compute a train-mode update on {x.shape[0]} image(s) of "
            f"{tuple(x.shape[-2:])} px (a feature map shrinks to one value): use larger images "
            "or a larger batch"
        ) from None
    loss = F.cross_entropy(logits, labels.to(dev).long())
    grads = torch.autograd.grad(loss, _params(site))
    out = {n: g.detach() for n, g in zip(trainable_names(site), grads, strict=True)}
    if kind is UpdateKind.DELTA:
        return {n: -lr * g for n, g in out.items()}
    return out


def as_gradient(
    update: Mapping[str, torch.Tensor], *, kind: UpdateKind, lr: float
) -> dict[str, torch.Tensor]:
    """The gradient an update implies: itself, or ``-delta / lr`` for a one-step delta."""
    if kind is UpdateKind.DELTA:
        return {n: -d / lr for n, d in update.items()}
    return dict(update)


def privatize(
    update: Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], float]:
    """A site's local DP step on ``update``: clip to L2 norm ``clip``, add N(0, (sigma C)^2).

    Returns the private update (same keys) and the update's norm before clipping. Only the
    trainable parameters are treated (the attack uses nothing else); a DP run's model has no
    BatchNorm statistics to protect (:func:`medfed.privacy.dp.make_private_model`).
    """
    clipped, norm = clip_by_l2(update, clip)
    noisy = add_gaussian_noise(clipped, noise_multiplier * clip, generator)
    return {k: noisy[k] for k in update}, norm


# --------------------------------------------------------------------------------------------
# Labels


def _classifier(model: nn.Module) -> str:
    """Module name of the last ``nn.Linear``: the classifier the labels are read from."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("label inference needs a final nn.Linear classifier; the model has none")
    return linears[-1]


def classifier_weight(model: nn.Module) -> str:
    """Parameter name of the classifier's weight (the last ``nn.Linear``)."""
    prefix = _classifier(model)
    name = f"{prefix}.weight" if prefix else "weight"
    if name not in trainable_names(model):
        raise ValueError(f"the classifier weight {name!r} is frozen: the update does not carry it")
    return name


def _dummy_statistics(
    model: nn.Module,
    *,
    batch_size: int,
    image_shape: Sequence[int],
    normalize: Normalize | str,
    generator: torch.Generator,
    device: torch.device,
    batches: int = 4,
) -> tuple[torch.Tensor, float]:
    """Mean softmax and mean classifier-input sum of the model on random images (dummy data)."""
    net = _site_copy(model, device)
    head = dict(net.named_modules())[_classifier(net)]
    feats: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach()))
    probs = []
    try:
        with torch.no_grad():
            for _ in range(batches):
                x = torch.rand((batch_size, *image_shape), generator=generator).to(device)
                probs.append(torch.softmax(net(model_input(x, normalize)).double(), dim=1))
    finally:
        handle.remove()
    return torch.cat(probs).mean(0).cpu(), float(torch.cat(feats).double().sum(1).mean())


def _round_counts(real: torch.Tensor, low: torch.Tensor, total: int) -> list[int]:
    """Non-negative integer counts summing to ``total``, near ``real`` and >= ``low`` if it can."""
    real = torch.maximum(real, low)
    counts = real.floor().clamp_min(0).long()
    while int(counts.sum()) < total:
        counts[int(torch.argmax(real - counts))] += 1
    while int(counts.sum()) > total:
        spare = (counts > low.long()) & (counts > 0)
        if not bool(spare.any()):
            spare = counts > 0
        excess = torch.where(spare, counts - real, torch.full_like(real, -math.inf))
        counts[int(torch.argmax(excess))] -= 1
    return [int(c) for c in counts]


def infer_labels(
    model: nn.Module,
    grads: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    image_shape: Sequence[int] | None = None,
    normalize: Normalize | str = "per_image",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """The batch's labels from the classifier gradient, sorted (a batch has no order to recover).

    One image (iDLG): the classifier's weight gradient is ``(p - y) h`` with features ``h >= 0``,
    so the true class's row is the only one summing negative - exact whatever the model.

    Batches: the bias gradient is ``p_bar - n / B`` (mean softmax minus label frequencies), so the
    counts are ``n_c = B (p_bar_c - db_c)`` (Geng et al. 2021). The server cannot see ``p_bar``;
    it is estimated as the model's mean softmax on random images (``image_shape`` (C, H, W)),
    and the counts are rounded to sum to ``B``, keeping the sure lower bound ``-B db_c``. Without
    a classifier bias, ``db_c`` is estimated as the weight row sum over the mean feature sum.
    Exact when the model's predictions hardly depend on the image (a new model); an estimate
    for a trained one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    weight = grads[classifier_weight(model)].detach().double().cpu()
    row_sums = weight.sum(dim=1)
    if batch_size == 1:
        return [int(torch.argmin(row_sums))]
    if image_shape is None:
        raise ValueError("label inference for a batch needs image_shape (C, H, W)")
    p_bar, feature_sum = _dummy_statistics(
        model, batch_size=batch_size, image_shape=image_shape, normalize=normalize,
        generator=generator or torch.Generator().manual_seed(0), device=torch.device(device),
    )  # fmt: skip
    prefix = _classifier(model)
    bias = grads.get(f"{prefix}.bias" if prefix else "bias")
    db = bias.detach().double().cpu() if bias is not None else row_sums / max(feature_sum, 1e-12)
    counts = _round_counts(batch_size * (p_bar - db), (-batch_size * db).ceil(), batch_size)
    return [c for c, n in enumerate(counts) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Images


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def _cosine_loss(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - cos`` between two parameter lists taken as single flat vectors (Geiping et al.)."""
    dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
    gnorm = sum(g.pow(2).sum() for g in grads)
    tnorm = sum(t.pow(2).sum() for t in target)
    return 1.0 - dot / (torch.sqrt(gnorm) * torch.sqrt(tnorm) + 1e-12)  # type: ignore[operator,arg-type]


def pyramid_sizes(size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Image sizes of a coarse-to-fine schedule: halving up to ``levels - 1`` times, >= 8 px."""
    out = [size]
    while len(out) < levels and min(out[0]) >= 16:
        out.insert(0, (out[0][0] // 2, out[0][1] // 2))
    return out


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def reconstruct(
    model: nn.Module,
    target_grads: Mapping[str, torch.Tensor],
    *,
    labels: Sequence[int] | torch.Tensor,
    shape: tuple[int, ...],
    options: AttackOptions,
    generator: torch.Generator,
    normalize: Normalize | str = "per_image",
    device: torch.device | str = "cpu",
    on_step: StepCallback | None = None,
) -> tuple[torch.Tensor, float]:
    """Images (B, C, H, W) in [0, 1] whose gradient best matches ``target_grads``, and its loss.

    ``shape`` is the batch shape (B, C, H, W); ``labels`` has B entries. ``on_step(k)`` is told
    after every k iterations (for a progress bar). Initialisations come from ``generator``.
    """
    dev = torch.device(device)
    net = _site_copy(model, dev)
    names = trainable_names(net)
    missing = [n for n in names if n not in target_grads]
    if missing:
        raise ValueError(
            f"the update lacks {len(missing)} trainable parameter(s), e.g. {missing[0]}"
        )
    target = [target_grads[n].detach().to(dev, torch.float32) for n in names]
    params = _params(net)
    y = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels).long().to(dev)
    if y.numel() != shape[0]:
        raise ValueError(f"{y.numel()} labels for a batch of {shape[0]}")
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    levels = pyramid_sizes((shape[2], shape[3]), options.pyramid)
    per_level = _split(options.iterations, len(levels))

    def objective(x: torch.Tensor, *, graph: bool) -> torch.Tensor:
        inp = model_input(x, normalize)
        loss = F.cross_entropy(net(inp), y)
        grads = torch.autograd.grad(loss, params, create_graph=graph)
        return _cosine_loss(grads, target) + options.tv_weight * _total_variation(inp)

    def full(z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[-2:]) == tuple(shape[-2:]):
            return z
        return F.interpolate(z, size=tuple(shape[-2:]), mode="bilinear", align_corners=False)

    best: tuple[float, torch.Tensor] | None = None
    for _ in range(options.restarts):
        z = torch.rand((*shape[:-2], *levels[0]), generator=generator).to(dev)
        for level, (size, steps) in enumerate(zip(levels, per_level, strict=True)):
            if tuple(z.shape[-2:]) != size:
                z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            z = z.detach().clamp(0.0, 1.0).requires_grad_(True)
            # A coarse pixel stands for 4^k full-size ones: larger steps there (measured).
            opt = torch.optim.Adam([z], lr=options.lr * 2.0 ** (len(levels) - 1 - level))
            milestones = [round(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            for _step in range(steps):
                rec = objective(full(z), graph=True)
                (grad,) = torch.autograd.grad(rec, [z])
                z.grad = grad.sign_()
                opt.step()
                sched.step()
                with torch.no_grad():
                    z.clamp_(0.0, 1.0)
                if on_step is not None:
                    on_step(1)
        x = full(z.detach())
        final = float(objective(x, graph=False))
        if best is None or final < best[0]:
            best = (final, x)
    assert best is not None
    return best[1].cpu(), best[0]


def attack(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    shape: tuple[int, ...],
    options: AttackOptions,
    generator: torch.Generator,
    lr: float,
    normalize: Normalize | str = "per_image",
    device: torch.device | str = "cpu",
    on_step: StepCallback | None = None,
) -> AttackResult:
    """Labels then images from one update of ``options.update`` kind (``lr``: its SGD step)."""
    start = time.perf_counter()
    grads = as_gradient(update, kind=options.update, lr=lr)
    labels = infer_labels(
        model, grads, batch_size=shape[0], image_shape=shape[1:], normalize=normalize,
        generator=generator, device=device,
    )  # fmt: skip
    images, loss = reconstruct(
        model, grads, labels=labels, shape=shape, options=options, generator=generator,
        normalize=normalize, device=device, on_step=on_step,
    )  # fmt: skip
    return AttackResult(labels, images, loss, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Scoring


def score_space(
    original: torch.Tensor, recon: torch.Tensor, normalize: Normalize | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals and reconstructions mapped to [0, 1] the same way, for SSIM/PSNR.

    ``fixed``: pixels as they are. ``per_image``: each image z-scored (what the network sees, the
    most the update can reveal), then all mapped by one affine map, the one that takes the
    originals' z-score range (over the batch) to [0, 1]; for one image that is its min-max
    stretch. The map does not depend on the pairing, so :func:`score` can match freely.
    """
    a, b = as_pixels(original).double().cpu(), recon.detach().double().cpu()
    if normalize == "fixed":
        return a, b.clamp(0.0, 1.0)
    za, zb = model_input(a, "per_image"), model_input(b, "per_image")
    lo, hi = float(za.min()), float(za.max())
    span = max(hi - lo, 1e-12)
    return ((za - lo) / span).clamp(0.0, 1.0), ((zb - lo) / span).clamp(0.0, 1.0)
