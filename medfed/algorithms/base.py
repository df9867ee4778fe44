"""The contract every federated algorithm meets: a client half and a pure server half.

One module per algorithm holds both halves. The engine owns the round loop, the runtime carries
tasks and updates, and the algorithm never knows which runtime it runs on.

Life cycle, as the engine drives it::

    algo = create_strategy(name, options)          # validated options, nothing else
    state = algo.init(global_params, context=ctx)   # derives structure (BN keys, N) from the model
    for each round:
        task = LocalTask(site, r, global_params, payload=algo.payload(state), client_state=kept)
        result = algo.local_update(model, task, data, opts, generator=g, device=d)   # at the site
        ... engine validates result.update against algo.uploaded_keys() ...
        global_params, state = algo.aggregate(global_params, updates, state, round_idx=r)

Configuration derived in ``init`` (FedBN's key set, SCAFFOLD's N) lives on the instance, so on
resume the engine calls ``init`` again and then swaps in the checkpointed ``StrategyState``;
everything that changes from round to round is in ``StrategyState`` (tensors in ``buffers``,
numbers in ``scalars``) so it checkpoints as safetensors + JSON.

The client half never relies on ``init``: at a site (possibly another process, under Flower) it
derives what it needs from the ``model`` it is handed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from medfed.algorithms.aggregate import fedavg_aggregate
from medfed.client.train import SampleDP, TrainOptions, TrainResult, train_local
from medfed.data.site import ArrayDataset
from medfed.types import Buffers, ClientState, ParamKind, Params, StrategyState, Task, Update


@dataclass(frozen=True)
class FederationContext:
    """What the server half may know about the federation: structure, never data."""

    model: nn.Module  # architecture (and initial weights); never trained on data here
    sites: tuple[str, ...]  # all site names in the federation, participating this round or not

    def __post_init__(self) -> None:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"site names must be unique, got {self.sites}")
        if not self.sites:
            raise ValueError("a federation needs at least one site")


@dataclass(frozen=True)
class LocalTask:
    """Everything a site receives for one round of local training."""

    site: str
    round_idx: int
    global_params: Params
    payload: Buffers = field(default_factory=dict)  # extra server->client tensors (SCAFFOLD's c)
    client_state: ClientState = field(default_factory=dict)  # what this site kept last time
    kind: Task = Task.CLASSIFICATION  # what the network learns: the loss, and the targets
    sample_dp: SampleDP | None = None  # DP-SGD for this round (set by medfed.privacy.dp)


@dataclass(frozen=True)
class LocalResult:
    update: Update
    client_state: ClientState = field(default_factory=dict)  # stays at the site


class Algorithm(Protocol):
    name: str
    preserves_consensus: bool
    """True when identical updates W always aggregate to W (an averaging rule). False for rules
    that take an optimizer step (FedOpt) or scale the step (SCAFFOLD with server_lr != 1)."""

    # --- server half (pure: no I/O, no loops over rounds) ---
    def init(self, global_params: Params, *, context: FederationContext) -> StrategyState: ...

    def uploaded_keys(self) -> frozenset[str] | None:
        """Keys every update must carry; ``None`` means all keys of the global params."""
        ...

    def payload(self, state: StrategyState) -> Buffers: ...

    def aggregate(
        self,
        global_params: Params,
        updates: Sequence[Update],
        state: StrategyState,
        *,
        round_idx: int,
    ) -> tuple[Params, StrategyState]: ...

    # --- client half ---
    def local_update(
        self,
        model: nn.Module,
        task: LocalTask,
        data: ArrayDataset,
        opts: TrainOptions,
        *,
        generator: torch.Generator,
        device: torch.device,
    ) -> LocalResult: ...

    def personalize(self, global_params: Params, client_state: ClientState) -> Params:
        """The model a site actually uses (FedBN: global weights + its own BN)."""
        ...


def load_params(model: nn.Module, params: Params, device: torch.device) -> None:
    model.load_state_dict({k: v.to(device) for k, v in params.items()}, strict=True)


def read_params(model: nn.Module) -> Params:
    """A detached copy of the model's full state (parameters and buffers), on the model's device.

    Kept on the device so a GPU federation validates and aggregates without host round-trips;
    checkpoints and any transport move tensors to the host themselves.
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weights_update(site: str, model: nn.Module, result: TrainResult) -> Update:
    return params_update(site, read_params(model), result)


def params_update(site: str, params: Params, result: TrainResult) -> Update:
    """The weights a site uploads after plain local training (sequential or vectorised)."""
    return Update(
        site=site,
        params=params,
        kind=ParamKind.WEIGHTS,
        num_examples=result.num_examples,
        metrics={"train_loss": result.loss, "steps": float(result.num_steps)},
    )


def plain_local_update(
    model: nn.Module,
    task: LocalTask,
    data: ArrayDataset,
    opts: TrainOptions,
    *,
    generator: torch.Generator,
    device: torch.device,
) -> LocalResult:
    """FedAvg's client half, reused by every algorithm whose client just trains locally."""
    load_params(model, task.global_params, device)
    result = train_local(
        model, data, opts, generator=generator, device=device, task=task.kind, dp=task.sample_dp
    )
    return LocalResult(weights_update(task.site, model, result))


# --- the client half in vectorisable form (medfed.runtime.vectorized) ---


class NotVectorizable(Exception):
    """This client half or setup cannot train as one batched computation; the message says why."""


LossTermFn = Callable[[Params, Params], torch.Tensor]
"""(one site's trainable params, the global trainable params) -> scalar added to its batch loss."""

GradTermFn = Callable[[Params, Params], Params]
"""(gradients stacked over sites (K, ...), per-site aux stacked alike) -> corrected gradients."""

Finish = Callable[["LocalTask", "LocalTask", Params, TrainResult, torch.Generator], "LocalResult"]
"""(task as received, task as trained, trained params, training result, the site's generator
after training) -> the site's result, exactly as its sequential client half would return it."""


def _same_task(task: LocalTask, data: ArrayDataset) -> LocalTask:
    return task


@dataclass(frozen=True)
class VectorStep:
    """A client half as ``train_local``'s plain loop plus pure, vmappable additions.

    The vectorised runtime trains many sites at once with the arithmetic of ``train_local``:
    ``options`` are the local options actually trained with (SCAFFOLD drops momentum),
    ``loss_term`` is the ``loss_term`` hook in functional form, ``grad_term`` the ``grad_hook``,
    and ``aux`` the per-site tensors it needs. ``admit`` runs the site-side checks before
    training (raising costs that site its round, as sequentially) and returns the task training
    sees. Each algorithm module declares its own step next to its sequential client half.
    """

    options: TrainOptions
    finish: Finish
    admit: Callable[[LocalTask, ArrayDataset], LocalTask] = _same_task
    aux: Callable[[LocalTask, torch.device], Params] | None = None
    loss_term: LossTermFn | None = None
    grad_term: GradTermFn | None = None


class Vectorizable(Protocol):
    def vector_step(self, opts: TrainOptions) -> VectorStep:
        """This algorithm's client half for ``opts``; raises :class:`NotVectorizable`."""
        ...


def plain_finish(
    task: LocalTask, trained: LocalTask, params: Params, result: TrainResult, _: torch.Generator
) -> LocalResult:
    return LocalResult(params_update(task.site, params, result))


def plain_vector_step(opts: TrainOptions) -> VectorStep:
    """FedAvg's client half (plain local training) in vectorisable form."""
    return VectorStep(options=opts, finish=plain_finish)


# --- model structure, read from modules rather than guessed from key names ---


def trainable_keys(model: nn.Module) -> frozenset[str]:
    """``state_dict`` keys of parameters that receive gradients (tied weights: every alias)."""
    return frozenset(
        name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
    )


def norm_layer_keys(model: nn.Module) -> frozenset[str]:
    """``state_dict`` keys (affine parameters and running statistics) of normalisation layers.

    Decided by ``isinstance(module, _NormBase)`` -- BatchNorm1d/2d/3d, SyncBatchNorm, lazy
    variants and InstanceNorm -- because names like ``bn1`` or ``downsample.1`` are a convention
    of some architectures, not a fact. LayerNorm/GroupNorm carry no per-site statistics and are
    not included.
    """
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _NormBase):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict())
    return frozenset(keys)


def check_context(global_params: Params, context: FederationContext) -> None:
    """Fail early when the global params do not belong to the model the context describes."""
    model_keys = set(context.model.state_dict())
    if model_keys != set(global_params):
        missing = sorted(model_keys - set(global_params))
        extra = sorted(set(global_params) - model_keys)
        raise ValueError(
            f"global params do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )


class AlgorithmBase:
    """Defaults shared by the concrete algorithms: plain local training, no payload, no state.

    Subclasses override what differs; ``aggregate`` must always be provided.
    """

    name: str = "base"
    preserves_consensus: bool = True

    def init(self, global_params: Params, *, context: FederationContext) -> StrategyState:
        check_context(global_params, context)
        return StrategyState()

    def uploaded_keys(self) -> frozenset[str] | None:
        return None

    def payload(self, state: StrategyState) -> Buffers:
        return {}

    def aggregate(
        self,
        global_params: Params,
        updates: Sequence[Update],
        state: StrategyState,
        *,
        round_idx: int,
    ) -> tuple[Params, StrategyState]:
        """FedAvg's merge: the server half FedAvg, FedProx and FedBN share (they differ only in
        their client halves, and FedBN in which keys are uploaded)."""
        new = fedavg_aggregate(global_params, updates, self.uploaded_keys())
        return new, replace(state, round=state.round + 1)

    def local_update(
        self,
        model: nn.Module,
        task: LocalTask,
        data: ArrayDataset,
        opts: TrainOptions,
        *,
        generator: torch.Generator,
        device: torch.device,
    ) -> LocalResult:
        return plain_local_update(model, task, data, opts, generator=generator, device=device)

    def vector_step(self, opts: TrainOptions) -> VectorStep:
        # A subclass with its own client half must declare its own vectorised form.
        if type(self).local_update is not AlgorithmBase.local_update:
            raise NotVectorizable(
                f"strategy {self.name!r} has its own client half without a vectorised form"
            )
        return plain_vector_step(opts)

    def personalize(self, global_params: Params, client_state: ClientState) -> Params:
        return global_params

    def __repr__(self) -> str:
        opts = getattr(self, "options", None)
        return f"{type(self).__name__}({self.name!r}, {opts!r})"
