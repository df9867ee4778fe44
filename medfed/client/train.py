"""The one local training / evaluation loop every paradigm and algorithm goes through.

Algorithms change local training only through two narrow hooks, so there is exactly one loop to
make fast: ``loss_term`` (added to each batch loss, e.g. FedProx's proximal term) and ``grad_hook``
(called after backward and before the optimizer step, e.g. SCAFFOLD's drift correction).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from medfed.client.augment import Augment, acquisition_shift
from medfed.data.site import ArrayDataset
from medfed.types import Task

LossTerm = Callable[[nn.Module], torch.Tensor]
GradHook = Callable[[nn.Module], None]

# Fixed intensity normalisation: every site must map pixels identically, and no site's statistics
# may leak into another's preprocessing.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


class TrainOptions(BaseModel):
    """Local training options; the same for every site in a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(
        1,
        gt=0,
        description="local passes over the site's data per round; fractional values train on that "
        "share of one more pass (how a study splits a pooled-epoch budget into rounds)",
    )
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps per local round")
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="multiplies lr once per round: round r trains at lr * lr_decay**r (a step "
        "that shrinks as the federation converges; under DP-SGD it also shrinks the parameter "
        "noise the last rounds leave)",
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    augment: Augment = Field(
        Augment.FLIP,
        description="none | flip | acquisition (flip plus redrawn scanner gain curve, contrast, "
        "blur, resolution and framing: what other hospitals' images look like; "
        "medfed.client.augment). true/false read as flip/none",
    )
    normalize: Literal["per_image", "fixed"] = Field(
        "per_image",
        description="per_image: z-score each image (removes scanner gain/contrast at every site, "
        "sharing no statistics); fixed: (x/255 - 0.5) / 0.25",
    )
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU")
    channels_last: bool = Field(True, description="on CUDA only")
    eval_batch_size: int = Field(256, ge=1)

    @field_validator("augment", mode="before")
    @classmethod
    def _bool_augment(cls, value: object) -> object:
        """Configs written before the policies said ``augment: true`` for the flip."""
        if isinstance(value, bool):
            return Augment.FLIP if value else Augment.NONE
        return value

    def at_round(self, round_idx: int) -> TrainOptions:
        """The options round ``round_idx`` trains with (its decayed learning rate)."""
        if self.lr_decay == 1.0 or round_idx == 0:
            return self
        return self.model_copy(update={"lr": self.lr * self.lr_decay**round_idx})


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    num_steps: int
    seconds: float


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_input(
    images: torch.Tensor, device: torch.device, *, normalize: str = "fixed"
) -> torch.Tensor:
    """uint8 (B, C, H, W) or (B, C, D, H, W) -> normalised float on ``device``.

    ``per_image`` standardises each image by its own mean and std: hospitals' scanners differ in
    gain and contrast, and a per-image z-score removes that without any site sharing statistics.
    """
    return normalize_unit(to_unit(images, device), normalize)


def to_unit(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float in [0, 1] on ``device``, where augmentation works on them."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def normalize_unit(x: torch.Tensor, normalize: str) -> torch.Tensor:
    """Float images in [0, 1] -> the network's input (in place where it can)."""
    if normalize == "per_image":
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True).clamp_min_(1.0 / 255.0)
        return x.sub_(mean).div_(std)
    return x.sub_(PIXEL_MEAN).div_(PIXEL_STD)


def make_optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay
        )
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[object]:
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def objective(task: Task) -> Objective:
    """The batch loss of ``task``: cross-entropy per image, or Dice + cross-entropy per pixel.

    Dice + CE (MONAI's ``DiceCELoss``) is the usual segmentation loss: CE gives smooth early
    gradients, Dice keeps a small foreground (a nodule, a tumour island) from being ignored.
    """
    if task is Task.CLASSIFICATION:
        return F.cross_entropy
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Loss in float32 even under bf16 autocast: the soft Dice sums are precision-sensitive.
        return dice_ce(logits.float(), target.unsqueeze(1))

    return seg_loss


def targets(data: ArrayDataset, task: Task, *, site: str = "") -> torch.Tensor:
    """What the network learns: image labels, or per-pixel masks (an error names the site)."""
    if task is Task.CLASSIFICATION:
        return data.labels
    if data.masks is None:
        where = f"site {site!r}" if site else "the dataset"
        raise ValueError(
            f"task segmentation needs masks, but {where} has none (give mask_path in the "
            "manifest, or use a source with masks)"
        )
    return data.masks


@dataclass(frozen=True)
class SampleDP:
    """Sample-level DP-SGD for one local round (Opacus): per-example clip, Gaussian noise."""

    noise_multiplier: float
    max_grad_norm: float
    secure_rng: bool = False


Batches = Iterator[tuple[torch.Tensor, torch.Tensor | None]]
"""(indices into the site's data, per-example flip flags or None), one item per optimizer step."""


def shuffled_batches(
    n: int, opts: TrainOptions, *, generator: torch.Generator, device: torch.device
) -> Batches:
    """Epochs of a fresh permutation, a fractional last pass, at most ``max_steps`` batches."""
    full_passes = math.floor(opts.epochs)
    passes = math.ceil(opts.epochs)
    steps = 0
    for epoch in range(passes):
        # The last pass of a fractional budget stops after its share of the data.
        quota = n if epoch < full_passes else max(1, round((opts.epochs - full_passes) * n))
        # One host->device copy per pass for the order and the flips: nothing inside the step
        # loop waits on the host, so a GPU stays busy.
        order = torch.randperm(n, generator=generator).to(device, non_blocking=True)
        flips = (
            (torch.rand(n, generator=generator) < 0.5).to(device, non_blocking=True)
            if opts.augment is not Augment.NONE
            else None
        )
        in_pass = 0
        for start in range(0, n, opts.batch_size):
            if in_pass >= quota:
                break
            stop = min(start + opts.batch_size, n)
            if stop - start < 2 and n > 1:
                break  # BatchNorm cannot train on a trailing batch of one
            yield order[start:stop], None if flips is None else flips[start:stop]
            in_pass += stop - start
            steps += 1
            if opts.max_steps is not None and steps >= opts.max_steps:
                return


def train_local(
    model: nn.Module,
    data: ArrayDataset,
    opts: TrainOptions,
    *,
    generator: torch.Generator,
    device: torch.device,
    loss_term: LossTerm | None = None,
    grad_hook: GradHook | None = None,
    task: Task = Task.CLASSIFICATION,
    dp: SampleDP | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``; all randomness comes from ``generator``.

    With ``dp`` the batches are Poisson-sampled and each step clips and noises per-example
    gradients through Opacus (:mod:`medfed.privacy.dpsgd`); the step itself is the same code.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    criterion = objective(task)
    start = time.perf_counter()
    model.train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest
    # channels_last is a 2-D layout; volumes keep the default (channels_last_3d gains little).
    channels_last = device.type == "cuda" and opts.channels_last and data.images.ndim == 4
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, opts)
    images, labels = data.images.to(device), targets(data, task).to(device)
    n = len(data)
    amp = opts.amp
    private = None
    if dp is None:
        net: nn.Module = model
        batches = shuffled_batches(n, opts, generator=generator, device=device)
    else:
        from medfed.privacy.dpsgd import PrivateTraining

        if loss_term is not None or grad_hook is not None:
            raise ValueError(
                "DP-SGD clips per-example gradients; a loss term or gradient hook would bypass "
                "the clip (use a FedAvg-type client half)"
            )
        private = PrivateTraining(model, optimizer, n, opts, dp, generator=generator)
        net, optimizer, batches = private.module, private.optimizer, private.batches(device)
        amp = False  # per-example gradients in float32: bf16 norms would blur the clip
    total_loss = torch.zeros((), device=device)
    seen = steps = 0
    for steps, (idx, flip) in enumerate(batches, start=1):  # noqa: B007
        x = to_unit(images[idx], device)
        y = labels[idx].long()
        if flip is not None:
            x = torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)
            if y.ndim > 1:  # a mask flips with its image
                y = torch.where(flip.view(-1, *([1] * (y.ndim - 1))), y.flip(-1), y)
        if opts.augment is Augment.ACQUISITION:
            x, moved = acquisition_shift(x, y if y.ndim > 1 else None, generator=generator)
            y = y if moved is None else moved
        x = normalize_unit(x, opts.normalize)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            loss = criterion(net(x), y)
        if loss_term is not None:
            loss = loss + loss_term(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None:
            grad_hook(model)
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        seen += len(idx)
    if private is not None:
        private.close()
        steps = private.steps
    mean_loss = float(total_loss.item()) / max(seen, 1)
    return TrainResult(mean_loss, seen, steps, time.perf_counter() - start)


def _eval_logits(
    model: nn.Module,
    data: ArrayDataset,
    *,
    device: torch.device,
    batch_size: int,
    amp: bool,
    normalize: str,
) -> Iterator[torch.Tensor]:
    """Eval-mode logits batch by batch; callers run it under ``torch.no_grad``."""
    model.eval()
    for start in range(0, len(data), batch_size):
        x = to_input(data.images[start : start + batch_size], device, normalize=normalize)
        with autocast(device, amp):
            yield model(x)


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    data: ArrayDataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    amp: bool = True,
    normalize: str = "per_image",
) -> np.ndarray:
    """Softmax probabilities (N, num_classes) in eval mode."""
    out = [
        torch.softmax(logits.float(), dim=1)
        for logits in _eval_logits(
            model, data, device=device, batch_size=batch_size, amp=amp, normalize=normalize
        )
    ]
    if not out:
        return np.zeros((0, 2), dtype=np.float64)
    # One device->host copy for the whole split, not one per batch.
    return torch.cat(out).cpu().double().numpy()


@torch.no_grad()
def predict_masks(
    model: nn.Module,
    data: ArrayDataset,
    *,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = True,
    normalize: str = "per_image",
) -> torch.Tensor:
    """Arg-max label maps (N, *spatial) as uint8 on the host, in eval mode.

    Masks stay at the site: callers reduce them to confusion counts before anything is sent.
    """
    out = [
        logits.argmax(dim=1).to(torch.uint8)
        for logits in _eval_logits(
            model, data, device=device, batch_size=batch_size, amp=amp, normalize=normalize
        )
    ]
    if not out:
        return torch.zeros((0, *data.images.shape[2:]), dtype=torch.uint8)
    return torch.cat(out).cpu()
