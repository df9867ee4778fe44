"""FedProx (Li et al. 2020): FedAvg plus a proximal term that keeps local weights near the global.

Client loss per batch: ``CE + mu/2 * ||w - w_global||^2`` over the *trainable parameters* only.
BatchNorm running statistics are not trained by gradient, so a penalty on them would do nothing.
The term enters through ``train_local``'s ``loss_term`` hook, so the one training loop is reused;
with ``mu == 0`` no hook is installed at all, which makes FedProx(0) bit-identical to FedAvg.
The server half is FedAvg's.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from medfed.algorithms.base import (
    AlgorithmBase,
    LocalResult,
    LocalTask,
    LossTermFn,
    VectorStep,
    load_params,
    plain_finish,
    weights_update,
)
from medfed.algorithms.registry import STRATEGIES
from medfed.client.train import LossTerm, TrainOptions, train_local
from medfed.data.site import ArrayDataset
from medfed.types import Params


class FedProxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mu: float = Field(0.01, ge=0, description="proximal coefficient; 0 gives FedAvg")


def proximal_term(model: nn.Module, mu: float) -> LossTerm:
    """``mu/2 * sum ||p - p_anchor||^2`` with anchors snapshotted from ``model`` right now.

    Its gradient with respect to p is ``mu * (p - p_anchor)``.
    """
    pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def term(_: nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=pairs[0][0].device) if pairs else torch.zeros(())
        for p, anchor in pairs:
            total = total + (p - anchor).pow(2).sum()
        return total * (mu / 2.0)

    return term


def proximal_loss(mu: float) -> LossTermFn:
    """:func:`proximal_term` as a pure function of (site params, global params), for vmap."""

    def term(params: Params, anchor: Params) -> torch.Tensor:
        total = torch.zeros(())
        for key, p in params.items():
            total = total + (p - anchor[key]).pow(2).sum()
        return total * (mu / 2.0)

    return term


class FedProx(AlgorithmBase):
    name = "fedprox"
    preserves_consensus = True

    def __init__(self, options: FedProxOptions | None = None) -> None:
        self.options = options or FedProxOptions()

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
        load_params(model, task.global_params, device)
        term = proximal_term(model, self.options.mu) if self.options.mu > 0 else None
        result = train_local(
            model,
            data,
            opts,
            generator=generator,
            device=device,
            loss_term=term,
            task=task.kind,
            dp=task.sample_dp,
        )
        return LocalResult(weights_update(task.site, model, result))

    def vector_step(self, opts: TrainOptions) -> VectorStep:
        mu = self.options.mu
        # mu == 0 installs no term, as sequentially: FedProx(0) stays FedAvg bit for bit.
        return VectorStep(
            options=opts, finish=plain_finish, loss_term=proximal_loss(mu) if mu > 0 else None
        )


STRATEGIES.register("fedprox", options=FedProxOptions)(FedProx)
