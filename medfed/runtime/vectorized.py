"""Vectorised client training: many sites' local rounds as one batched computation.

A cross-device round samples hundreds of small clients; a loop over them keeps a GPU waiting on
tiny kernels and on Python. Here the sampled sites' trainable parameters are stacked on a leading
axis and ``torch.func.vmap`` runs forward, backward and the optimizer step for all of them at
once (``functional_call`` + ``grad_and_value``), chunk by chunk.

The arithmetic is ``train_local``'s, so results equal the sequential path within float
tolerance: each site's batches come from ``shuffled_batches`` with its own (seed, round, site)
generator, the same optimizer with the hyperparameters ``make_optimizer`` gives it (re-stated
functionally, below), the same loss and input normalisation, and the algorithm's client half in
its declared vectorisable form (:class:`medfed.algorithms.base.VectorStep`). Sites whose last
batch is shorter than the others' are padded with zero-weight samples, so only the step count
must agree; sites are grouped by it. What this path does not reproduce is refused with a reason
(:func:`static_reason`) and the runtime trains those rounds sequentially.

BatchNorm is per site: each site's running statistics are stacked like its parameters and passed
to ``functional_call`` as batched buffers, so the layer's in-place running-average update lands
in that site's slice (checked against sequential training in the tests). Batch statistics would
see padding samples, so models with batch-statistics layers are grouped by the exact sequence of
batch sizes, never padded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.dropout import _DropoutNd

from medfed.algorithms.base import Algorithm, LocalResult, LocalTask, NotVectorizable, VectorStep
from medfed.client.augment import Augment
from medfed.client.train import (
    Batches,
    TrainOptions,
    TrainResult,
    autocast,
    make_optimizer,
    shuffled_batches,
    to_input,
)
from medfed.config import VectorizeMode
from medfed.data.site import ArrayDataset
from medfed.seeding import derive_seed, torch_generator
from medfed.types import Params, Task

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- what is supported


def run_mode(mode: VectorizeMode, device: torch.device) -> VectorizeMode:
    """A run's ``runtime.vectorize`` on ``device``: ``auto`` vectorises on an accelerator only.

    On a CPU the batched kernels gain little (benchmarks/README.md), and the sequential path
    stays bit-identical to plain PyTorch loops and to Flower; ``on`` still vectorises there.
    """
    return VectorizeMode.OFF if mode is VectorizeMode.AUTO and device.type == "cpu" else mode


def vector_step_of(algorithm: Algorithm, opts: TrainOptions) -> VectorStep:
    """The algorithm's declared vectorisable client half; :class:`NotVectorizable` if none."""
    declare = getattr(algorithm, "vector_step", None)
    if declare is None:
        raise NotVectorizable(f"strategy {algorithm.name!r} declares no vectorised client half")
    step = declare(opts)
    assert isinstance(step, VectorStep)
    return step


def model_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot train per site under vmap with sequential results, if it cannot."""
    for name, module in model.named_modules():
        if isinstance(module, nn.SyncBatchNorm):
            return f"layer {name!r} is SyncBatchNorm, which reduces across processes"
        if isinstance(module, _DropoutNd | nn.AlphaDropout) and module.p > 0:
            return f"layer {name!r} is dropout, which draws from each site's global RNG"
    return None


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a sample's output depends on the other samples of its batch (BatchNorm in
    training, or running statistics that every sample updates): such batches cannot be padded."""
    return any(
        isinstance(m, _BatchNorm) or (isinstance(m, _NormBase) and m.track_running_stats)
        for m in model.modules()
    )


def static_reason(
    model: nn.Module,
    algorithm: Algorithm,
    opts: TrainOptions,
    *,
    task: Task,
    device: torch.device,
) -> str | None:
    """Why this run's client rounds cannot be vectorised (None: they can)."""
    if task is not Task.CLASSIFICATION:
        return f"task {task}: only the classification loss is vectorised"
    reason = model_reason(model)
    if reason is not None:
        return reason
    if opts.augment is Augment.ACQUISITION:
        return "train.augment 'acquisition' transforms each site's batches in the sequential loop"
    try:
        step = vector_step_of(algorithm, opts)
    except NotVectorizable as err:
        return str(err)
    return FunctionalOptimizer.reason(model, step.options)


# --------------------------------------------------------------------------- the optimizer


@dataclass
class FunctionalOptimizer:
    """``make_optimizer``'s optimizer, re-stated on parameters stacked over sites.

    The hyperparameters are read from the optimizer ``make_optimizer`` builds, and the update
    follows PyTorch's single-tensor SGD/Adam/AdamW step, so a stacked site moves exactly as its
    own optimizer would move it.
    """

    kind: str
    hp: dict[str, float]
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    t: int = 0

    @staticmethod
    def _group(model: nn.Module, opts: TrainOptions) -> tuple[str, dict[str, object]]:
        optimizer = make_optimizer(model, opts)
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        kind = "sgd" if isinstance(optimizer, torch.optim.SGD) else opts.optimizer
        return kind, group

    @classmethod
    def reason(cls, model: nn.Module, opts: TrainOptions) -> str | None:
        kind, g = cls._group(model, opts)
        if kind == "sgd" and (g.get("nesterov") or g.get("dampening")):
            return "SGD with nesterov or dampening is not vectorised"
        if g.get("maximize") or g.get("amsgrad"):
            return f"{kind} with maximize/amsgrad is not vectorised"
        return None

    @classmethod
    def create(cls, model: nn.Module, opts: TrainOptions) -> FunctionalOptimizer:
        kind, g = cls._group(model, opts)
        hp = {"lr": float(g["lr"]), "weight_decay": float(g["weight_decay"])}  # type: ignore[arg-type]
        if kind == "sgd":
            hp["momentum"] = float(g["momentum"])  # type: ignore[arg-type]
        else:
            betas = g["betas"]
            assert isinstance(betas, tuple)
            hp |= {"beta1": float(betas[0]), "beta2": float(betas[1]), "eps": float(g["eps"])}  # type: ignore[arg-type]
        return cls(kind, hp)

    @torch.no_grad()
    def step(self, params: Params, grads: Params, *, skip: frozenset[str] = frozenset()) -> None:
        """One step for every site at once, in place on the stacked ``params``.

        ``skip``: parameters the loss never reaches. ``torch.func`` hands them a zero gradient,
        but ``torch.optim`` leaves a parameter whose ``.grad`` is None alone (no weight decay, no
        momentum, no Adam step), so they must not move here either.
        """
        self.t += 1
        lr, wd = self.hp["lr"], self.hp["weight_decay"]
        for key, p in params.items():
            if key in skip:
                continue
            g = grads[key]
            st = self.state.setdefault(key, {})
            if self.kind == "sgd":
                if wd:
                    g = g.add(p, alpha=wd)
                mu = self.hp["momentum"]
                if mu:
                    buf = st.get("buf")
                    if buf is None:
                        buf = st["buf"] = g.clone()
                    else:
                        buf.mul_(mu).add_(g)
                    g = buf
                p.add_(g, alpha=-lr)
                continue
            if self.kind == "adamw":
                p.mul_(1 - lr * wd)
            elif wd:
                g = g.add(p, alpha=wd)
            b1, b2 = self.hp["beta1"], self.hp["beta2"]
            if not st:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            m, v = st["m"], st["v"]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step_size = lr / (1 - b1**self.t)
            denom = (v.sqrt() / (1 - b2**self.t) ** 0.5).add_(self.hp["eps"])
            p.addcdiv_(m, denom, value=-step_size)


# --------------------------------------------------------------------------- one round


@dataclass(frozen=True)
class SiteJob:
    """One admitted site of this round: its task as received and as trained, its data, and its
    generator after drawing its batches (DP noise draws from it afterwards, as sequentially)."""

    task: LocalTask
    trained: LocalTask
    data: ArrayDataset
    generator: torch.Generator
    batches: list[tuple[torch.Tensor, torch.Tensor | None]]


def draw_batches(
    n: int, opts: TrainOptions, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The site's whole round of batches, drawn exactly as ``train_local`` draws them."""
    batches: Batches = shuffled_batches(n, opts, generator=generator, device=CPU)
    return list(batches)


@dataclass(frozen=True)
class _Layout:
    """Where every site's samples are in the chunk's pooled data, step by step."""

    index: torch.Tensor  # (S, K, B) int64 into the pooled images
    weight: torch.Tensor  # (S, K, B) 1 for a real sample, 0 for padding
    flips: torch.Tensor | None  # (S, K, B) bool


def _layout(jobs: Sequence[SiteJob], offsets: Sequence[int], augment: bool) -> _Layout:
    steps = len(jobs[0].batches)
    width = max(len(idx) for job in jobs for idx, _ in job.batches)
    index = torch.zeros(steps, len(jobs), width, dtype=torch.int64)
    weight = torch.zeros(steps, len(jobs), width)
    flips = torch.zeros(steps, len(jobs), width, dtype=torch.bool) if augment else None
    for k, (job, off) in enumerate(zip(jobs, offsets, strict=True)):
        if all(len(idx) == width for idx, _ in job.batches):  # the common case: one copy
            index[:, k] = torch.stack([idx for idx, _ in job.batches]) + off
            weight[:, k] = 1.0
            if flips is not None:
                flips[:, k] = torch.stack([f for _, f in job.batches if f is not None])
            continue
        index[:, k] = off  # padding repeats the site's first image with weight 0
        for s, (idx, flip) in enumerate(job.batches):
            index[s, k, : len(idx)] = idx + off
            weight[s, k, : len(idx)] = 1.0
            if flips is not None and flip is not None:
                flips[s, k, : len(idx)] = flip
    return _Layout(index, weight, flips)


class VectorTrainer:
    """Trains chunks of sites that take the same number of steps, as one vmapped computation."""

    def __init__(
        self, model: nn.Module, step: VectorStep, *, device: torch.device, normalize: str
    ) -> None:
        self.model = model
        self.step = step
        self.device = device
        self.normalize = normalize
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        # Running statistics are per site, like the weights: stacked, and updated in place
        # through vmap by the layers themselves.
        self.buffers = [n for n, b in model.named_buffers() if b is not None]
        self.full_batches = uses_batch_statistics(model)
        self.keys = list(model.state_dict())
        self.unused: frozenset[str] = frozenset()  # found by probe(): see FunctionalOptimizer
        loss_term = step.loss_term
        model_ref = model

        def site_loss(
            params: Params,
            buffers: Params,
            shared: Params,
            x: torch.Tensor,
            y: torch.Tensor,
            w: torch.Tensor,
            anchor: Params,
        ) -> torch.Tensor:
            logits = functional_call(model_ref, (params, buffers, shared), (x,))
            ce = F.cross_entropy(logits, y, reduction="none")
            loss = (ce * w).sum() / w.sum().clamp_min(1.0)
            if loss_term is not None:
                loss = loss + loss_term(params, anchor)
            return loss

        self.grad_fn: Callable[..., tuple[Params, torch.Tensor]] = vmap(
            grad_and_value(site_loss), in_dims=(0, 0, None, 0, 0, 0, None)
        )

    def _stacked(self, global_params: Params, k_sites: int) -> tuple[Params, Params, Params]:
        """Trainable parameters and buffers repeated per site; the rest shared."""
        per_site = [*self.trainable, *self.buffers]
        device = self.device
        stacked = {
            k: global_params[k].to(device).unsqueeze(0).repeat_interleave(k_sites, 0)
            for k in per_site
        }
        shared = {k: v.to(device) for k, v in global_params.items() if k not in stacked}
        params = {k: stacked[k] for k in self.trainable}
        buffers = {k: stacked[k] for k in self.buffers}
        return params, buffers, shared

    def probe(self, global_params: Params, spatial: Sequence[int], in_chans: int) -> str | None:
        """Run one tiny vmapped step; the error, if the model does not survive vmap."""
        params, buffers, shared = self._stacked(global_params, 2)
        x = torch.zeros(2, 2, in_chans, *spatial, device=self.device)
        y = torch.zeros(2, 2, dtype=torch.int64, device=self.device)
        w = torch.ones(2, 2, device=self.device)
        anchor = {k: v[0] for k, v in params.items()}
        try:
            self.model.train()
            with autocast(self.device, self.step.options.amp):
                self.grad_fn(params, buffers, shared, x, y, w, anchor)
        except Exception as err:  # any failure means: not this model, train sequentially
            return f"the model does not run under torch.func.vmap ({type(err).__name__}: {err})"
        self.unused = self._unused_parameters(params, buffers, shared, x[0], anchor)
        return None

    def _unused_parameters(
        self, params: Params, buffers: Params, shared: Params, x: torch.Tensor, anchor: Params
    ) -> frozenset[str]:
        """Trainable parameters that get no gradient in a plain autograd pass of the loss.

        The sequential path's ``torch.optim`` skips them; so does :class:`FunctionalOptimizer`.
        When the algorithm adds to every gradient (SCAFFOLD's correction), the sequential path
        gives them that term as their gradient, and so nothing is skipped. Buffers are cloned, so
        the probe leaves no trace in the running statistics.
        """
        if self.step.grad_term is not None:
            return frozenset()
        site = {k: v[0].detach().requires_grad_(True) for k, v in params.items()}
        own = {k: v[0].clone() for k, v in buffers.items()}
        with autocast(self.device, self.step.options.amp):
            loss = functional_call(self.model, (site, own, shared), (x,)).float().sum()
            if self.step.loss_term is not None:
                loss = loss + self.step.loss_term(site, anchor)
        names = list(site)
        grads = torch.autograd.grad(loss, [site[k] for k in names], allow_unused=True)
        return frozenset(k for k, g in zip(names, grads, strict=True) if g is None)

    def train(self, jobs: Sequence[SiteJob], global_params: Params) -> list[LocalResult]:
        """Every job's local round; all jobs take the same number of steps."""
        device, opts = self.device, self.step.options
        k_sites = len(jobs)
        params, buffers, shared = self._stacked(global_params, k_sites)
        anchor = {k: global_params[k].to(device) for k in self.trainable}
        aux: Params = {}
        if self.step.aux is not None:
            per_site = [self.step.aux(job.trained, device) for job in jobs]
            for job, site_aux in zip(jobs, per_site, strict=True):
                if not set(site_aux) <= set(self.trainable):
                    raise ValueError(
                        f"site {job.task.site!r}: per-site tensors {sorted(site_aux)[:3]} are "
                        "not trainable parameters of the model"
                    )
            aux = {k: torch.stack([a[k] for a in per_site]) for k in per_site[0]}
        sizes = [len(job.data) for job in jobs]
        offsets = [sum(sizes[:i]) for i in range(k_sites)]
        images = torch.cat([job.data.images for job in jobs]).to(device)
        labels = torch.cat([job.data.labels for job in jobs]).to(device)
        layout = _layout(jobs, offsets, opts.augment is not Augment.NONE)
        index, weight = layout.index.to(device), layout.weight.to(device)
        flips = None if layout.flips is None else layout.flips.to(device)
        optimizer = FunctionalOptimizer.create(self.model, opts)
        total = torch.zeros(k_sites, device=device)
        self.model.train()
        sample_shape = images.shape[1:]
        for s in range(index.shape[0]):
            ix = index[s]
            x = to_input(images[ix.reshape(-1)], device, normalize=opts.normalize)
            x = x.view(k_sites, ix.shape[1], *sample_shape)
            if flips is not None:
                f = flips[s].view(*ix.shape, *([1] * len(sample_shape)))
                x = torch.where(f, x.flip(-1), x)
            with autocast(device, opts.amp):  # bf16 on CUDA, as train_local's forward
                grads, loss = self.grad_fn(
                    params, buffers, shared, x, labels[ix].long(), weight[s], anchor
                )
            if self.step.grad_term is not None:
                grads = self.step.grad_term(grads, aux)
            optimizer.step(params, grads, skip=self.unused)
            total += loss.detach() * weight[s].sum(1)
        seen = weight.sum((0, 2)).tolist()
        losses = total.tolist()
        results = []
        for i, job in enumerate(jobs):
            site_params = {
                k: params[k][i] if k in params else buffers[k][i] if k in buffers else shared[k]
                for k in self.keys
            }
            result = TrainResult(
                loss=losses[i] / max(seen[i], 1.0),
                num_examples=int(seen[i]),
                num_steps=len(job.batches),
                seconds=0.0,
            )
            results.append(
                self.step.finish(job.task, job.trained, site_params, result, job.generator)
            )
        return results


@dataclass(frozen=True)
class RoundSplit:
    """This round's sites: trained together (groups of equal step counts), or sequentially."""

    groups: list[list[SiteJob]]
    sequential: list[str]
    failures: dict[str, Exception]


class VectorizedClients:
    """The in-process runtime's vectorised path: admits sites, groups them, trains chunks."""

    def __init__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        opts: TrainOptions,
        *,
        device: torch.device,
        seed: int,
        min_clients: int,
        chunk: int,
    ) -> None:
        self.model, self.algorithm, self.opts, self.device = model, algorithm, opts, device
        self.step = vector_step_of(algorithm, opts)
        self.trainer = VectorTrainer(model, self.step, device=device, normalize=opts.normalize)
        self.seed, self.min_clients, self.chunk = seed, min_clients, chunk
        self._probed: str | None | bool = False
        self._round = 0

    def _at_round(self, round_idx: int) -> None:
        """Rebuild the client half for this round's options when the learning rate decays (an
        algorithm's client half may read the rate, e.g. SCAFFOLD's control-variate update)."""
        if self.opts.lr_decay == 1.0 or round_idx == self._round:
            return
        self._round = round_idx
        self.step = vector_step_of(self.algorithm, self.opts.at_round(round_idx))
        unused = self.trainer.unused  # a property of the model and loss, not of the rate
        self.trainer = VectorTrainer(
            self.model, self.step, device=self.device, normalize=self.opts.normalize
        )
        self.trainer.unused = unused

    def probe(self, global_params: Params, data: ArrayDataset) -> str | None:
        """The reason the model does not vmap (checked once, on the first site's shape)."""
        if self._probed is False:
            self._probed = self.trainer.probe(global_params, data.spatial_shape, data.in_chans)
        assert self._probed is not True
        return self._probed

    def split(self, tasks: Sequence[LocalTask], data: Sequence[ArrayDataset]) -> RoundSplit:
        """Admit each site (its own checks, as sequentially) and draw its round's batches."""
        # Sites train together when they take the same number of steps (short last batches are
        # padded), or, under batch statistics, the very same batch sizes (nothing padded).
        by_steps: dict[tuple[int, ...], list[SiteJob]] = {}
        if tasks:
            self._at_round(tasks[0].round_idx)
        sequential: list[str] = []
        failures: dict[str, Exception] = {}
        opts = self.step.options
        for task, site_data in zip(tasks, data, strict=True):
            try:
                trained = self.step.admit(task, site_data)
            except Exception as err:  # a site's refusal costs it its round, as sequentially
                failures[task.site] = err
                continue
            if trained.sample_dp is not None or len(site_data) == 0:
                sequential.append(task.site)  # DP-SGD, or the empty-site error, sequentially
                continue
            generator = torch_generator(self.seed, "train", task.round_idx, task.site)
            batches = draw_batches(len(site_data), opts, generator)
            job = SiteJob(task, trained, site_data, generator, batches)
            shape = (
                tuple(len(idx) for idx, _ in batches)
                if self.trainer.full_batches
                else (len(batches),)
            )
            by_steps.setdefault(shape, []).append(job)
        groups: list[list[SiteJob]] = []
        for jobs in by_steps.values():
            if len(jobs) < self.min_clients:
                sequential.extend(job.task.site for job in jobs)
            else:
                groups.extend(
                    list(jobs[i : i + self.chunk]) for i in range(0, len(jobs), self.chunk)
                )
        return RoundSplit(groups, sequential, failures)

    def train(self, group: Sequence[SiteJob]) -> list[LocalResult]:
        return self.trainer.train(group, group[0].task.global_params)

    def reseed(self, task: LocalTask) -> None:
        """Leave the global RNG as the sequential loop would after ``task``'s site (it seeds it
        per site; the models vectorised here draw nothing from it)."""
        torch.manual_seed(derive_seed(self.seed, "torch", task.round_idx, task.site))
