"""The contract every federated algorithm meets: a client half and a pure server half.

One module per algorithm holds both halves. The engine owns the round loop, the runtime carries
tasks and updates, and the algorithm never knows which runtime it runs on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from medfed.client.train import TrainOptions, TrainResult, train_local
from medfed.data.site import ArrayDataset
from medfed.types import Buffers, ClientState, Params, ParamKind, StrategyState, Update


@dataclass(frozen=True)
class LocalTask:
    """Everything a site receives for one round of local training."""

    site: str
    round_idx: int
    global_params: Params
    payload: Buffers = field(default_factory=dict)  # extra server->client tensors (SCAFFOLD's c)
    client_state: ClientState = field(default_factory=dict)  # what this site kept last time


@dataclass(frozen=True)
class LocalResult:
    update: Update
    client_state: ClientState = field(default_factory=dict)  # stays at the site


class Algorithm(Protocol):
    name: str

    # --- server half (pure: no I/O, no loops over rounds) ---
    def init(self, global_params: Params) -> StrategyState: ...

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
    """A detached CPU copy of the model's full state (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def weights_update(site: str, model: nn.Module, result: TrainResult) -> Update:
    return Update(
        site=site,
        params=read_params(model),
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
    result = train_local(model, data, opts, generator=generator, device=device)
    return LocalResult(weights_update(task.site, model, result))
