"""Shared fixtures: tiny, seeded, learnable federations that build in milliseconds."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import settings

from medfed.data.site import ArrayDataset, Federation, Site

# CI must be reproducible: the same examples every run (locally, hypothesis keeps exploring).
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def make_site_data(
    n: int, *, size: int = 16, seed: int = 0, prevalence: float = 0.5
) -> ArrayDataset:
    """Class 1 images carry a bright square; noise makes the task imperfect but learnable."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(np.int64)
    labels[:2] = [0, 1]  # both classes always present
    img = rng.normal(100, 30, size=(n, 1, size, size))
    q = size // 4
    img[labels == 1, :, q : 2 * q, q : 2 * q] += 60
    images = torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8))
    return ArrayDataset(images=images, labels=torch.from_numpy(labels))


def make_federation(
    n_sites: int = 3, *, n: int = 48, size: int = 16, seed: int = 0, external: bool = True
) -> Federation:
    sites = tuple(
        Site.from_dataset(f"site{i}", make_site_data(n + 8 * i, size=size, seed=seed + i), seed=i)
        for i in range(n_sites)
    )
    ext = None
    if external:
        data = make_site_data(40, size=size, seed=seed + 100)
        ext = Site("external", data, data)
    return Federation(sites, ext)


@pytest.fixture
def tiny_federation() -> Federation:
    return make_federation()
