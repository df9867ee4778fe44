"""FedISCA's server-side image synthesis: DeepInversion from an ensemble of client models.

FedISCA (Kang et al., MICCAI 2023, github.com/myeongkyunkang/FedISCA) is one-shot: each site
uploads its trained model once, and the server distils them into a global model on images it
synthesizes itself, so no image ever leaves a site. The synthesis is DeepInversion (Yin et al.,
CVPR 2020, github.com/NVlabs/DeepInversion), in the CIFAR-style variant FedISCA's code uses:

* start from Gaussian noise and optimise the *pixels* with Adam;
* cross-entropy of the ensemble (mean of the teachers' logits) to balanced target labels;
* BatchNorm matching: for every BatchNorm layer of every teacher, the batch mean and
  (biased) variance of that layer's *input* are pulled to the layer's running statistics,
  ``||mu - running_mean||_2 + ||var - running_var||_2`` over channels, summed over layers;
* total-variation (L2 of the horizontal, vertical and two diagonal differences) and L2 priors;
* a random roll ("jitter") of the batch every iteration; an optional horizontal flip.

The intermediate images are kept as *snapshots*: the synthetic set spans noise to realistic
images, which is what keeps the distilled global model from over-fitting (the paper's point).

Images live in the teachers' *input space*: normalised floats, the space
:func:`medfed.client.train.to_input` maps uint8 images into (per-image z-scores by default).
Gaussian noise starts there; nothing is ever converted back to uint8 except for display
(:func:`to_display`).

DeepInversion needs BatchNorm running statistics: they are the only image prior beyond TV/L2.
Teachers without BatchNorm (GroupNorm, no normalisation) still vote through the cross-entropy
but add no BN term; if *no* teacher has BatchNorm, :func:`synthesize` refuses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Progress = Callable[[int, Mapping[str, float]], None]
"""Called after every synthesis iteration with (iteration, that iteration's losses)."""

LOSS_KEYS = ("total", "ce", "bn", "tv", "tv_l1", "l2")


class FedISCAOptions(BaseModel):
    """FedISCA's hyperparameters. Defaults are the reference code's (``main_fedisca.py``) for
    small (MedMNIST, 28 px) images; :meth:`preset` gives the published small/large settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- synthesis (DeepInversion) --
    synthesis_iterations: int = Field(
        500, ge=1, description="Adam steps on the pixels per synthesis round (1000 for large)"
    )
    synthesis_lr: float = Field(0.05, gt=0, description="Adam learning rate on the pixels")
    bn_weight: float = Field(10.0, ge=0, description="weight of the BatchNorm-matching loss")
    first_bn_multiplier: float = Field(
        1.0,
        ge=0,
        description="extra factor on each teacher's first BN layer; FedISCA uses none (1), "
        "DeepInversion's ImageNet script uses 10",
    )
    tv_weight: float = Field(
        2.5e-5, ge=0, description="total variation, L2 of neighbour differences (DI's tv_l2)"
    )
    tv_l1_weight: float = Field(
        0.0, ge=0, description="total variation, mean |difference| (DI ImageNet's tv_l1)"
    )
    l2_weight: float = Field(0.0, ge=0, description="L2 norm of the images (FedISCA: 0)")
    jitter: int | None = Field(
        None,
        ge=0,
        description="max random roll in pixels per iteration; None: the reference rule, "
        "30 for images wider than 128 px, else 2",
    )
    flip: bool = Field(
        False, description="random horizontal flip per iteration (DI ImageNet; FedISCA: off)"
    )
    batch_size: int = Field(256, ge=1, description="synthetic images per round (50 for large)")
    snapshot_every: int = Field(
        1,
        ge=1,
        description="keep the images every this many iterations (the reference keeps every "
        "one); larger values save memory on large images",
    )
    # -- client model adaptation --
    adapt_momentum: float | None = Field(
        0.1,
        gt=0,
        le=1,
        description="BN momentum when re-estimating the noise-adapted copies' running stats "
        "(snapshots run realistic -> noise, so the noisiest weigh most); None: plain average",
    )
    adapted_bn: Literal["batch", "running"] = Field(
        "batch",
        description="how noise-adapted teachers normalise during distillation: 'batch' "
        "normalises each snapshot with its own statistics (the reference runs them in train "
        "mode); 'running' uses the re-estimated running statistics",
    )
    # -- distillation --
    temperature: float = Field(20.0, gt=0, description="KD temperature T (loss scaled by T^2)")
    rounds: int = Field(
        100,
        ge=1,
        description="server rounds of fresh synthesis + distillation (the reference "
        "re-synthesizes every epoch, 100 times); still one upload per site",
    )
    distill_epochs: int = Field(1, ge=1, description="passes over one round's snapshots")
    student_init: Literal["scratch", "average"] = Field(
        "scratch",
        description="where the global model starts: 'scratch', the run's seeded initial "
        "weights (FedISCA), or 'average', the example-weighted mean of the uploaded teachers "
        "(as FedDF starts its fusion; needs every teacher in the run's architecture)",
    )
    distill_optimizer: Literal["sgd", "adam"] = "sgd"
    distill_lr: float = Field(1e-3, gt=0)
    distill_momentum: float = Field(0.9, ge=0, lt=1)
    distill_weight_decay: float = Field(5e-4, ge=0)
    lr_milestones: tuple[float, ...] = Field(
        (0.5, 0.75),
        description="fractions of all distillation epochs at which the lr drops by lr_gamma "
        "(the reference: epochs 50 and 75 of 100)",
    )
    lr_gamma: float = Field(0.1, gt=0, le=1)
    seed: int = Field(
        0,
        description="seed for the server's generator (synthesis noise, jitter, flips); the "
        "functions here take the generator itself, so whoever wires them seeds it from this",
    )

    @field_validator("lr_milestones")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < f <= 1 for f in value):
            raise ValueError(f"lr_milestones are fractions of the epochs in (0, 1], got {value}")
        return value

    @classmethod
    def preset(cls, name: Literal["small", "large"], **overrides: Any) -> FedISCAOptions:
        """The published settings: ``small`` (28 px MedMNIST: 500 iterations, batch 256) or
        ``large`` (224 px RSNA, ISIC 2019, diabetic retinopathy: 1000 iterations, batch 50)."""
        presets: dict[str, dict[str, Any]] = {
            "small": {"synthesis_iterations": 500, "batch_size": 256},
            "large": {"synthesis_iterations": 1000, "batch_size": 50},
        }
        if name not in presets:
            raise ValueError(f"unknown FedISCA preset {name!r}; choose 'small' or 'large'")
        return cls(**{**presets[name], **overrides})

    def jitter_for(self, width: int) -> int:
        """The roll range for images ``width`` pixels wide."""
        if self.jitter is not None:
            return self.jitter
        return 30 if width > 128 else 2


class Snapshot(NamedTuple):
    """One kept state of the synthetic batch: after ``iteration`` Adam steps (0: the noise)."""

    iteration: int
    images: torch.Tensor  # float (B, C, H, W) in the teachers' input space, on the CPU
    labels: torch.Tensor  # int64 (B,), balanced over the classes


@dataclass(frozen=True)
class Synthesis:
    """One synthesis round: the snapshots (noise first) and every iteration's losses.

    ``losses`` maps each of :data:`LOSS_KEYS` to one unweighted value per iteration (``total``
    is the weighted objective); ``teacher_accuracy`` is how often the ensemble predicts the
    target label on the final images.
    """

    snapshots: tuple[Snapshot, ...]
    losses: dict[str, list[float]]
    teacher_accuracy: float


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics to match."""
    return any(_tracks_stats(m) for m in model.modules())


def _tracks_stats(module: nn.Module) -> bool:
    return (
        isinstance(module, _BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def bn_statistic_distance(x: torch.Tensor, bn: _BatchNorm) -> torch.Tensor:
    """DeepInversion's per-layer feature loss for the input ``x`` of ``bn``:
    ``||running_var - var||_2 + ||running_mean - mean||_2`` over channels, the batch statistics
    taken over every dimension but the channel one, the variance biased (as BN normalises)."""
    assert bn.running_mean is not None and bn.running_var is not None
    dims = [0, *range(2, x.ndim)]
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return torch.linalg.vector_norm(bn.running_var.to(var.dtype) - var) + torch.linalg.vector_norm(
        bn.running_mean.to(mean.dtype) - mean
    )


class BNStatHook:
    """Forward hooks on every BatchNorm layer (with running stats) of ``models``.

    After a forward pass, :meth:`loss` is the sum of :func:`bn_statistic_distance` over all
    hooked layers, each model's first BN layer scaled by ``first_multiplier``. The teachers must
    be in eval mode so BN itself uses (and does not update) the running statistics. Use as a
    context manager, or call :meth:`close`: a hook left behind would slow every later forward.
    """

    def __init__(self, models: Sequence[nn.Module], *, first_multiplier: float = 1.0) -> None:
        self._values: dict[int, torch.Tensor] = {}
        self._scale: dict[int, float] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for model in models:
            layers = [m for m in model.modules() if _tracks_stats(m)]
            for i, layer in enumerate(layers):
                self._scale[id(layer)] = first_multiplier if i == 0 else 1.0
                self._handles.append(layer.register_forward_hook(self._hook))

    @property
    def num_layers(self) -> int:
        return len(self._handles)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
        assert isinstance(module, _BatchNorm)
        self._values[id(module)] = bn_statistic_distance(inputs[0], module)

    def loss(self) -> torch.Tensor:
        """The weighted sum over the layers seen since the last :meth:`reset`."""
        if not self._values:
            raise RuntimeError("no BatchNorm layer ran: call loss() after a forward pass")
        terms = [v * self._scale[k] for k, v in self._values.items()]
        return torch.stack(terms).sum()

    def reset(self) -> None:
        self._values.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._values.clear()

    def __enter__(self) -> BNStatHook:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The mean of the models' logits (FedISCA's ``Ensemble``); architectures may differ."""
    outs = [m(x) for m in models]
    shapes = {tuple(o.shape) for o in outs}
    if len(shapes) != 1:
        raise ValueError(f"teachers disagree on the output shape: {sorted(shapes)}")
    return torch.stack(outs).mean(dim=0)


@contextmanager
def eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode for the duration, each module's previous mode restored afterwards."""
    before = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in before:
            m.training = training


def balanced_labels(batch_size: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: every class equally often (up to one)."""
    return torch.arange(batch_size) % num_classes


def total_variation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2, L1) total variation over horizontal, vertical and both diagonal neighbours, as in
    DeepInversion: L2 is the sum of the four difference tensors' norms, L1 the sum of means."""
    diffs = (
        x[..., :, :-1] - x[..., :, 1:],
        x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    )
    l2 = torch.stack([torch.linalg.vector_norm(d) for d in diffs]).sum()
    l1 = torch.stack([d.abs().mean() for d in diffs]).sum()
    return l2, l1


def synthesize(
    teachers: Sequence[nn.Module],
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    options: FedISCAOptions,
    generator: torch.Generator,
    device: torch.device,
    progress: Progress | None = None,
) -> Synthesis:
    """One DeepInversion round from the ensemble of ``teachers`` (see the module docstring).

    ``image_shape`` is (C, H, W); the noise, jitter and flips all come from ``generator`` (a CPU
    generator: the same seed gives the same images on any device). Teachers are moved to
    ``device``, run in eval mode (their previous modes restored) and get no gradients: only the
    pixels are optimised. Snapshots (noise first, then every ``snapshot_every`` iterations, and
    always the last) are kept on the CPU.
    """
    if not teachers:
        raise ValueError("synthesis needs at least one teacher")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    if not any(has_batchnorm(t) for t in teachers):
        raise ValueError(
            "no teacher has BatchNorm running statistics: DeepInversion matches them, and "
            "without them only TV/L2 priors would shape the images (use BN client models)"
        )
    for t in teachers:
        t.to(device)
    bs, opts = options.batch_size, options
    labels = balanced_labels(bs, num_classes)
    targets = labels.to(device)
    pixels = torch.randn((bs, *image_shape), generator=generator).to(device).requires_grad_()
    optimizer = torch.optim.Adam([pixels], lr=opts.synthesis_lr)
    lim = opts.jitter_for(image_shape[-1])
    snapshots = [Snapshot(0, pixels.detach().cpu().clone(), labels)]
    losses: dict[str, list[float]] = {k: [] for k in LOSS_KEYS}

    with eval_mode(teachers), BNStatHook(teachers, first_multiplier=opts.first_bn_multiplier) as h:
        for it in range(1, opts.synthesis_iterations + 1):
            x = pixels
            if lim > 0:
                dx, dy = torch.randint(-lim, lim + 1, (2,), generator=generator).tolist()
                x = torch.roll(x, shifts=(dx, dy), dims=(-2, -1))
            if opts.flip and bool(torch.rand((), generator=generator) < 0.5):
                x = torch.flip(x, dims=(-1,))
            h.reset()
            ce = F.cross_entropy(ensemble_logits(teachers, x), targets)
            bn = h.loss()
            tv, tv_l1 = total_variation(x)
            l2 = torch.linalg.vector_norm(x)
            total = (
                ce
                + opts.bn_weight * bn
                + opts.tv_weight * tv
                + opts.tv_l1_weight * tv_l1
                + opts.l2_weight * l2
            )
            (grad,) = torch.autograd.grad(total, [pixels])
            optimizer.zero_grad(set_to_none=True)
            pixels.grad = grad
            optimizer.step()
            values = torch.stack([total, ce, bn, tv, tv_l1, l2]).detach().cpu().tolist()
            step = dict(zip(LOSS_KEYS, values, strict=True))
            for k, v in step.items():
                losses[k].append(v)
            if progress is not None:
                progress(it, step)
            if it % opts.snapshot_every == 0 or it == opts.synthesis_iterations:
                snapshots.append(Snapshot(it, pixels.detach().cpu().clone(), labels))
        h.reset()
        with torch.no_grad():
            pred = ensemble_logits(teachers, pixels).argmax(dim=1)
        accuracy = float((pred == targets).float().mean().item())
    if not all(math.isfinite(v) for v in losses["total"]):
        raise FloatingPointError("synthesis diverged (non-finite loss); lower synthesis_lr")
    return Synthesis(tuple(snapshots), losses, accuracy)


def to_display(images: torch.Tensor) -> torch.Tensor:
    """Input-space floats (B, C, H, W) -> uint8 for a snapshot grid, min-max per image (as
    ``torchvision.utils.save_image(normalize=True, scale_each=True)``); flat images -> 0."""
    x = images.detach().float().cpu()
    dims = tuple(range(1, x.ndim))
    lo = x.amin(dim=dims, keepdim=True)
    span = (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-12)
    return ((x - lo) / span * 255.0).round().clamp(0, 255).to(torch.uint8)
