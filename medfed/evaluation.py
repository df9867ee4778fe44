"""Server-side evaluation in simulation: internal validation (pooled and per site) and external.

In simulation the engine can score every site's validation split directly; a deployment asks the
sites instead (their cases never leave), through the same :class:`~medfed.engine.RoundEval`.

Segmentation is scored from sufficient statistics: each site reduces its predicted masks to
per-image confusion counts (TP/FP/FN/TN per class) and the pooled metrics are the metrics of the
summed counts -- exactly what a deployed site would send, so simulation and deployment agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from medfed.algorithms import Algorithm
from medfed.algorithms.base import load_params
from medfed.client.train import predict_masks, predict_proba, targets
from medfed.data.site import ArrayDataset, Site
from medfed.metrics.classification import accuracy, multiclass_auc
from medfed.types import ClientState, Params, Task

Scores = dict[str, float]

#: The metric progress lines, local-only summaries and studies rank models by.
PRIMARY_METRIC = {Task.CLASSIFICATION: "auc", Task.SEGMENTATION: "dice"}


class Scorer:
    """One task's way from a model and a split to per-case results and to metrics."""

    def __init__(
        self,
        task: Task,
        *,
        device: torch.device,
        batch_size: int,
        normalize: str,
        num_classes: int,
    ) -> None:
        self.task, self.device = task, device
        self.batch_size, self.normalize, self.num_classes = batch_size, normalize, num_classes

    def cases(self, model: nn.Module, data: ArrayDataset, *, site: str = "") -> np.ndarray:
        """Per-case results: class probabilities (N, K), or confusion counts (N, K, 4)."""
        if self.task is Task.CLASSIFICATION:
            return predict_proba(
                model,
                data,
                device=self.device,
                batch_size=self.batch_size,
                normalize=self.normalize,
            )
        from medfed.metrics.segmentation import confusion_counts

        truth = targets(data, self.task, site=site).cpu()
        pred = predict_masks(
            model, data, device=self.device, batch_size=self.batch_size, normalize=self.normalize
        )
        return confusion_counts(pred, truth, num_classes=self.num_classes).numpy()

    def metrics(self, data: ArrayDataset, cases: np.ndarray) -> Scores:
        if self.task is Task.CLASSIFICATION:
            y = data.labels.cpu().numpy()
            return {"auc": multiclass_auc(y, cases), "acc": accuracy(y, cases)}
        from medfed.metrics.segmentation import summarize

        return dict(summarize(cases))


class Evaluator:
    """Internal validation, pooled and per site; each site scores with the model it would use.

    The pooled validation set is concatenated once per run. When every site uses the same model
    (all algorithms but personalised ones such as FedBN) it is scored in one pass and per-site
    metrics are sliced out of it, instead of one small forward pass per site.
    """

    def __init__(self, sites: Sequence[Site], *, scorer: Scorer) -> None:
        self.sites = [s for s in sites if len(s.val)]
        self.pooled = ArrayDataset.concat([s.val for s in self.sites])
        self.bounds = np.cumsum([0] + [len(s.val) for s in self.sites])
        self.scorer = scorer

    def __call__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        global_params: Params,
        client_states: Mapping[str, ClientState],
    ) -> tuple[Scores, dict[str, Scores]]:
        params = [
            algorithm.personalize(global_params, client_states.get(s.name, {})) for s in self.sites
        ]
        if all(p is params[0] for p in params):
            load_params(model, params[0], self.scorer.device)
            cases = self.scorer.cases(model, self.pooled)
        else:
            parts = []
            for site, site_params in zip(self.sites, params, strict=True):
                load_params(model, site_params, self.scorer.device)
                parts.append(self.scorer.cases(model, site.val, site=site.name))
            cases = np.concatenate(parts)
        per_site = {}
        for site, lo, hi in zip(self.sites, self.bounds[:-1], self.bounds[1:], strict=True):
            per_site[site.name] = self.scorer.metrics(site.val, cases[lo:hi]) | {
                "n": float(hi - lo)
            }
        return self.scorer.metrics(self.pooled, cases), per_site


def evaluate_external(
    model: nn.Module, params: Params, site: Site | None, *, scorer: Scorer
) -> Scores | None:
    if site is None or len(site.val) == 0:
        return None
    load_params(model, params, scorer.device)
    return scorer.metrics(site.val, scorer.cases(model, site.val, site=site.name))
