"""FedISCA (Kang et al., MICCAI 2023): one-shot FL by distillation on synthesized images.

Each site trains its model once and uploads it once; there are no further rounds with the
sites. The server then, for ``options.rounds`` server-side rounds (the reference code
re-synthesizes every epoch):

1. **Synthesis** (:func:`~medfed.algorithms.fedisca_synthesis.synthesize`): DeepInversion from
   the ensemble of client models; every intermediate image is kept, from noise to realistic.
2. **Client model adaptation** (:func:`adapt_teachers`): copies of the client models whose
   BatchNorm statistics are re-estimated on those snapshots. Early snapshots are near noise,
   a domain the client models never saw; their BN statistics are wrong there, and the adapted
   copies give sensible soft labels where the originals do not.
3. **Distillation** (:func:`distill`): the global model learns by KL divergence at temperature
   T from both teacher sets, one step per snapshot, noise first. The weight ``alpha`` on the
   *original* teachers rises from 0 to 1 across the snapshots, so the noise-adapted teachers
   teach on the noisy images and the originals on the realistic ones (the reference's
   ``alpha * KD(original) + (1 - alpha) * KD(noise-adapted)``, ``alpha = k / K``; here
   ``k / (K - 1)`` so the last snapshot is taught by the originals alone).

Client models may differ in architecture: the ensemble is the mean of their logits.

Model selection uses a caller-supplied ``validate`` callable (validation data only); the
reference keeps the best epoch by *test* accuracy, which this implementation deliberately does
not reproduce. Nothing here sees data: images are synthesized, and the test split is never used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medfed.algorithms.aggregate import weighted_mean
from medfed.algorithms.fedisca_synthesis import (
    BNStatHook,
    FedISCAOptions,
    Progress,
    Snapshot,
    Synthesis,
    bn_statistic_distance,
    ensemble_logits,
    eval_mode,
    has_batchnorm,
    synthesize,
    to_display,
)

__all__ = [
    "BNStatHook",
    "DistillResult",
    "Distiller",
    "FedISCAOptions",
    "Snapshot",
    "Synthesis",
    "adapt_teachers",
    "bn_statistic_distance",
    "distill",
    "has_batchnorm",
    "kd_loss",
    "one_shot",
    "synthesize",
    "to_display",
]

Validate = Callable[[nn.Module], float]
"""Scores the student on *validation* data, higher is better; never pass test data."""


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_teachers(
    teachers: Sequence[nn.Module],
    snapshots: Sequence[Snapshot],
    *,
    device: torch.device,
    momentum: float | None = 0.1,
) -> list[nn.Module]:
    """Noise-adapted copies of ``teachers``: BN running statistics re-estimated on ``snapshots``.

    Each copy runs the snapshots from the last (most realistic) to the first (noise) with only
    its BN layers in train mode, so with an exponential ``momentum`` the statistics end up
    closest to the noise (as in the reference). ``momentum=None`` resets the statistics and takes
    the plain average over all snapshots. Weights are untouched, the originals too; the copies
    come back in eval mode on ``device``. Teachers without BN come back as plain copies.
    """
    adapted: list[nn.Module] = []
    for teacher in teachers:
        clone = copy.deepcopy(teacher).to(device).eval()
        layers = _batchnorms(clone)
        saved = [layer.momentum for layer in layers]
        for layer in layers:
            if momentum is None:
                layer.reset_running_stats()
            layer.momentum = momentum
            layer.train()
        if layers:
            for snap in reversed(snapshots):
                clone(snap.images.to(device))
        for layer, m in zip(layers, saved, strict=True):
            layer.momentum = m
        adapted.append(clone.eval())
    return adapted


@contextmanager
def batch_statistics(models: Sequence[nn.Module]) -> Iterator[None]:
    """Models in eval mode except BN, which normalises with each batch's own statistics; the
    running statistics (and counters) are restored afterwards, so nothing is mutated."""
    layers = [layer for model in models for layer in _batchnorms(model)]
    saved = [{k: v.clone() for k, v in layer.named_buffers()} for layer in layers]
    with eval_mode(models):
        try:
            for layer in layers:
                layer.train()
            yield
        finally:
            for layer, buffers in zip(layers, saved, strict=True):
                for k, v in layer.named_buffers():
                    v.copy_(buffers[k])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T)) * T^2``, batch mean: the T^2 keeps the
    gradient's scale independent of T (Hinton et al.)."""
    log_q = F.log_softmax(student_logits / t, dim=1)
    p = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * (t * t)


@dataclass(frozen=True)
class DistillResult:
    """The chosen student state and the record that chose it.

    ``state_dict`` is the student at ``best_epoch`` (1-based; the last epoch when no
    ``validate`` was given), also loaded back into the student; ``losses`` has one mean KD loss
    per epoch, ``validation`` one score per epoch (empty without ``validate``).
    """

    state_dict: dict[str, torch.Tensor]
    losses: tuple[float, ...]
    validation: tuple[float, ...]
    best_epoch: int

    @property
    def epochs(self) -> int:
        return len(self.losses)


class Distiller:
    """The global model's training across epochs (and synthesis rounds): optimizer, step-decay
    schedule over ``total_epochs`` and validation-based model selection live here, so
    :func:`one_shot` can feed it a fresh synthesis each round."""

    def __init__(
        self,
        student: nn.Module,
        *,
        options: FedISCAOptions,
        total_epochs: int,
        device: torch.device,
        validate: Validate | None = None,
    ) -> None:
        self.student = student.to(device)
        self.options = options
        self.device = device
        self.validate = validate
        params = [p for p in student.parameters() if p.requires_grad]
        if options.distill_optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params,
                lr=options.distill_lr,
                momentum=options.distill_momentum,
                weight_decay=options.distill_weight_decay,
            )
        else:
            self.optimizer = torch.optim.Adam(
                params, lr=options.distill_lr, weight_decay=options.distill_weight_decay
            )
        milestones = sorted({max(1, round(f * total_epochs)) for f in options.lr_milestones})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=milestones, gamma=options.lr_gamma
        )
        self.losses: list[float] = []
        self.scores: list[float] = []
        self._best: tuple[int, float, dict[str, torch.Tensor]] | None = None

    def epoch(
        self, teachers: Sequence[nn.Module], adapted: Sequence[nn.Module], synthesis: Synthesis
    ) -> float:
        """One pass over the snapshots, noise first, one optimizer step each; returns the mean
        loss. Teachers' and adapted teachers' modes and statistics are left as they were. An
        empty ``adapted`` distils from the original teachers alone (the ablation without client
        model adaptation)."""
        opts, t = self.options, self.options.temperature
        snaps = synthesis.snapshots
        if not snaps:
            raise ValueError("the synthesis has no snapshots")
        adapted_mode = (
            batch_statistics(adapted) if opts.adapted_bn == "batch" else eval_mode(adapted)
        )
        total = 0.0
        self.student.train()
        with eval_mode(teachers), adapted_mode:
            for k, snap in enumerate(snaps):
                x = snap.images.to(self.device)
                alpha = k / (len(snaps) - 1) if len(snaps) > 1 else 1.0
                with torch.no_grad():
                    original = ensemble_logits(teachers, x)
                    noisy = ensemble_logits(adapted, x) if adapted else original
                out = self.student(x)
                loss = alpha * kd_loss(out, original, t) + (1.0 - alpha) * kd_loss(out, noisy, t)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach().item())
        self.scheduler.step()
        mean = total / len(snaps)
        if not math.isfinite(mean):
            raise FloatingPointError("distillation diverged (non-finite loss); lower distill_lr")
        self.losses.append(mean)
        if self.validate is not None:
            score = float(self.validate(self.student))
            self.scores.append(score)
            if self._best is None or (math.isfinite(score) and score > self._best[1]):
                self._best = (len(self.losses), score, _cpu_state(self.student))
        return mean

    def result(self) -> DistillResult:
        """The best student by validation (the last one without ``validate``), loaded back."""
        if not self.losses:
            raise RuntimeError("no distillation epoch has run")
        if self._best is None:
            best_epoch, state = len(self.losses), _cpu_state(self.student)
        else:
            best_epoch, _, state = self._best
            self.student.load_state_dict(state)
        return DistillResult(state, tuple(self.losses), tuple(self.scores), best_epoch)


def teacher_average(
    teachers: Sequence[nn.Module], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The example-weighted mean of the teachers' states (weights and BN buffers alike).

    One-shot FedAvg of the uploads: a start for the student that already ranks cases about as
    well as the ensemble does (the sites trained from the same seeded weights), which the
    distillation then refines. Teachers of different architectures have no mean.
    """
    try:
        return weighted_mean([_cpu_state(t) for t in teachers], weights)
    except ValueError as err:  # FedAvg's own structure check names the key or shape
        raise ValueError(
            f"the teachers cannot be averaged ({err}): student_init 'average' needs every "
            "teacher in one architecture (heterogeneous teachers distil into a student started "
            "from scratch)"
        ) from None


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def distill(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    adapted: Sequence[nn.Module],
    synthesis: Synthesis,
    *,
    options: FedISCAOptions,
    device: torch.device,
    validate: Validate | None = None,
) -> DistillResult:
    """Train ``student`` in place for ``options.distill_epochs`` passes over one synthesis.

    Deterministic given its inputs (the snapshot order is the schedule), so it takes no
    generator. With ``validate`` (validation data only), the best-scoring epoch is kept.
    """
    distiller = Distiller(
        student,
        options=options,
        total_epochs=options.distill_epochs,
        device=device,
        validate=validate,
    )
    for _ in range(options.distill_epochs):
        distiller.epoch(teachers, adapted, synthesis)
    return distiller.result()


def one_shot(
    teachers: Sequence[nn.Module],
    student: nn.Module,
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    options: FedISCAOptions,
    generator: torch.Generator,
    device: torch.device,
    validate: Validate | None = None,
    progress: Progress | None = None,
    on_round: Callable[[int, Synthesis], None] | None = None,
) -> DistillResult:
    """The server side of FedISCA: ``options.rounds`` x (synthesize -> adapt -> distill).

    ``teachers`` are the sites' uploaded models (one each); ``student`` is the global model,
    trained in place. ``on_round(round, synthesis)`` sees each round's synthesis (e.g. to keep a
    snapshot grid for the report) before it is dropped; ``progress`` is passed to
    :func:`synthesize`.
    """
    distiller = Distiller(
        student,
        options=options,
        total_epochs=options.rounds * options.distill_epochs,
        device=device,
        validate=validate,
    )
    for r in range(options.rounds):
        synthesis = synthesize(
            teachers,
            num_classes=num_classes,
            image_shape=image_shape,
            options=options,
            generator=generator,
            device=device,
            progress=progress,
        )
        adapted = adapt_teachers(
            teachers, synthesis.snapshots, device=device, momentum=options.adapt_momentum
        )
        if on_round is not None:
            on_round(r, synthesis)
        for _ in range(options.distill_epochs):
            distiller.epoch(teachers, adapted, synthesis)
    return distiller.result()
