"""FedBN (Li et al. 2021): normalisation layers stay at the site.

Scanners, stains and protocols shift each site's feature statistics; FedBN lets every site keep
its own BatchNorm -- affine weight/bias *and* running mean/var/count -- and federates the rest.

* Client: load the global non-BN weights plus this site's own BN (kept in its ``ClientState``;
  on its first round the site starts from the global's initial BN), train, upload only the non-BN
  keys, keep the trained BN in the new ``ClientState``. BN never leaves the site.
* Server: FedAvg over the non-BN keys. The global's BN entries are never updated: they stay the
  initial values and only seed a site's first round (and a site that never trained).
* ``personalize``: the model a site evaluates with = global non-BN + its own BN.

Which keys are BN is read from module types (``norm_layer_keys``), on the server in ``init`` and
at the client from the model it trains, never guessed from names.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from medfed.algorithms.base import (
    AlgorithmBase,
    FederationContext,
    LocalResult,
    LocalTask,
    check_context,
    load_params,
    norm_layer_keys,
    read_params,
)
from medfed.algorithms.registry import STRATEGIES
from medfed.client.train import TrainOptions, train_local
from medfed.data.site import ArrayDataset
from medfed.types import ClientState, ParamKind, Params, StrategyState, Update

LOCAL_BN = "bn"
"""``ClientState`` group holding the site's own normalisation-layer tensors."""


class FedBNOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def with_local_norm(global_params: Params, client_state: ClientState) -> Params:
    """Global params with the site's own BN entries swapped in (global order and key set)."""
    own = client_state.get(LOCAL_BN, {})
    return {k: own.get(k, v) for k, v in global_params.items()}


class FedBN(AlgorithmBase):
    name = "fedbn"
    preserves_consensus = True

    def __init__(self, options: FedBNOptions | None = None) -> None:
        self.options = options or FedBNOptions()
        self._shared: frozenset[str] | None = None
        self.norm_keys: frozenset[str] = frozenset()

    def init(self, global_params: Params, *, context: FederationContext) -> StrategyState:
        check_context(global_params, context)
        self.norm_keys = norm_layer_keys(context.model)
        self._shared = frozenset(global_params) - self.norm_keys
        return StrategyState()

    def uploaded_keys(self) -> frozenset[str] | None:
        if self._shared is None:
            raise RuntimeError("fedbn: call init() first; the uploaded keys depend on the model")
        return self._shared

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
        norm = norm_layer_keys(model)
        own = task.client_state.get(LOCAL_BN, {})
        start: Params = {}
        for k in model.state_dict():
            if k in norm and k in own:
                start[k] = own[k]
            elif k in task.global_params:
                start[k] = task.global_params[k]
            else:
                # Falling back to the worker model's current tensors could leak another site's BN.
                raise ValueError(f"fedbn: no value for {k!r} in the global params or site state")
        load_params(model, start, device)
        result = train_local(
            model, data, opts, generator=generator, device=device, task=task.kind, dp=task.sample_dp
        )
        trained = read_params(model)
        update = Update(
            site=task.site,
            params={k: v for k, v in trained.items() if k not in norm},
            kind=ParamKind.WEIGHTS,
            num_examples=result.num_examples,
            metrics={"train_loss": result.loss, "steps": float(result.num_steps)},
        )
        kept = {k: v for k, v in trained.items() if k in norm}
        return LocalResult(update, client_state={LOCAL_BN: kept})

    def personalize(self, global_params: Params, client_state: ClientState) -> Params:
        return with_local_norm(global_params, client_state)


STRATEGIES.register("fedbn", options=FedBNOptions)(FedBN)
