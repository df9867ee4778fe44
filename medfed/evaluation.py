"""Server-side evaluation in simulation: internal validation (pooled and per site) and external.

In simulation the engine can score every site's validation split directly; a deployment asks the
sites instead (their cases never leave), through the same :class:`~medfed.engine.RoundEval`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from medfed.algorithms import Algorithm
from medfed.algorithms.base import load_params
from medfed.client.train import predict_proba
from medfed.data.site import ArrayDataset, Site
from medfed.metrics.classification import accuracy, multiclass_auc
from medfed.types import ClientState, Params


class Evaluator:
    """Internal validation, pooled and per site; each site scores with the model it would use.

    The pooled validation set is concatenated once per run. When every site uses the same model
    (all algorithms but personalised ones such as FedBN) it is scored in one pass and per-site
    metrics are sliced out of it, instead of one small forward pass per site.
    """

    def __init__(
        self, sites: Sequence[Site], *, device: torch.device, batch_size: int, normalize: str
    ) -> None:
        self.sites = [s for s in sites if len(s.val)]
        self.pooled = ArrayDataset.concat([s.val for s in self.sites])
        self.bounds = np.cumsum([0] + [len(s.val) for s in self.sites])
        self.labels = self.pooled.labels.numpy()
        self.device, self.batch_size, self.normalize = device, batch_size, normalize

    def _predict(self, model: nn.Module, data: ArrayDataset) -> np.ndarray:
        return predict_proba(
            model, data, device=self.device, batch_size=self.batch_size, normalize=self.normalize
        )

    def __call__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        global_params: Params,
        client_states: Mapping[str, ClientState],
    ) -> tuple[float, float, dict[str, dict[str, float]]]:
        params = [
            algorithm.personalize(global_params, client_states.get(s.name, {})) for s in self.sites
        ]
        if all(p is params[0] for p in params):
            load_params(model, params[0], self.device)
            proba = self._predict(model, self.pooled)
        else:
            parts = []
            for site, site_params in zip(self.sites, params, strict=True):
                load_params(model, site_params, self.device)
                parts.append(self._predict(model, site.val))
            proba = np.concatenate(parts)
        per_site = {}
        for site, lo, hi in zip(self.sites, self.bounds[:-1], self.bounds[1:], strict=True):
            y, p = self.labels[lo:hi], proba[lo:hi]
            per_site[site.name] = {
                "auc": multiclass_auc(y, p),
                "acc": accuracy(y, p),
                "n": float(hi - lo),
            }
        return multiclass_auc(self.labels, proba), accuracy(self.labels, proba), per_site


def evaluate_external(
    model: nn.Module,
    params: Params,
    site: Site | None,
    *,
    device: torch.device,
    batch_size: int,
    normalize: str,
) -> tuple[float | None, float | None]:
    if site is None or len(site.val) == 0:
        return None, None
    load_params(model, params, device)
    proba = predict_proba(
        model, site.val, device=device, batch_size=batch_size, normalize=normalize
    )
    y = site.val.labels.numpy()
    return multiclass_auc(y, proba), accuracy(y, proba)
