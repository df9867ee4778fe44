"""Building a run's pieces from its config: the federation, the initial model, the scorer.

Shared by every loop (star, peer-to-peer, one-shot), the Flower site and server apps, the study
and the audit, so each builds the same federation and the same seeded initial weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medfed.config import DataConfig, DataSource, RunConfig
from medfed.data.site import Federation
from medfed.evaluation import Scorer
from medfed.models.factory import create_model
from medfed.seeding import derive_seed


def load_federation(data: DataConfig) -> tuple[Federation, dict[str, Any] | None]:
    """The configured federation, and for real data the load report (counts, skipped files)."""
    if data.source is DataSource.FILES:
        from medfed.data.sources.federation import build_files_federation

        assert data.files is not None  # the config validator guarantees it
        fed, report = build_files_federation(data.files)
        return fed, report.to_json()
    if data.source is DataSource.SYNTHETIC_HISTOLOGY:
        from medfed.data.synthetic.histology import synthesize_histology_federation

        return synthesize_histology_federation(data.histology, cache_dir=data.cache_dir), None
    from medfed.data.synthetic.ultrasound import synthesize_federation

    # cache_dir None -> $MEDFED_CACHE_DIR or ~/.cache/medfed (the generator decides, in one place)
    return synthesize_federation(data.ultrasound, cache_dir=data.cache_dir), None


def build_federation(config: RunConfig) -> Federation:
    return load_federation(config.data)[0]


def build_model(config: RunConfig, federation: Federation) -> nn.Module:
    site = federation.sites[0]
    shape = site.train.spatial_shape if len(site.train) else site.val.spatial_shape
    return model_for_shape(
        config,
        num_classes=federation.num_outputs(config.task),
        in_chans=federation.in_chans,
        image_size=shape[-1],
        spatial_shape=shape,
    )


def model_for_shape(
    config: RunConfig,
    *,
    num_classes: int,
    in_chans: int,
    image_size: int,
    spatial_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """The run's initial model; a server that holds no data learns the shape from the sites.

    ``spatial_shape`` (H, W) or (D, H, W) decides 2-D or 3-D; without it the input is a square
    ``image_size`` image.
    """
    shape = spatial_shape or (image_size, image_size)
    # The initial weights are part of the experiment: derive them from the seed.
    torch.manual_seed(derive_seed(config.seed, "init"))
    model = create_model(
        config.model.name,
        num_classes=max(num_classes, 2),
        in_chans=in_chans,
        image_size=shape,
        spatial_dims=len(shape),
        pretrained_path=config.model.pretrained_path,
        freeze_backbone=config.model.freeze_backbone,
    )
    if config.privacy.dp is not None:
        from medfed.privacy.dp import make_private_model

        model = make_private_model(model)  # BatchNorm -> GroupNorm: no unprotected statistics
    return model


def run_scorer(config: RunConfig, fed: Federation, device: torch.device) -> Scorer:
    """How the run's models are scored: the task's metrics, the run's eval batch and inputs."""
    return Scorer(
        config.task,
        device=device,
        batch_size=config.train.eval_batch_size,
        normalize=config.train.normalize,
        num_classes=fed.num_outputs(config.task),
    )
