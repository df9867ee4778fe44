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


def make_seg_site_data(n: int, *, size: int = 16, seed: int = 0) -> ArrayDataset:
    """Bright squares at random places on noise, their footprint as the mask.

    Every other image is normal tissue (empty mask), so the empty-mask conventions are exercised;
    the squares sit in the left half, so a mask that did not flip with its image would be wrong.
    """
    rng = np.random.default_rng(seed)
    images = rng.normal(90, 25, size=(n, 1, size, size))
    masks = np.zeros((n, size, size), dtype=np.uint8)
    side = size // 4
    for i in range(n):
        if i % 2 == 0:
            continue
        r = rng.integers(0, size - side)
        c = rng.integers(0, size // 2 - side + 1)
        masks[i, r : r + side, c : c + side] = 1
    images[:, 0][masks == 1] += 90
    labels = torch.from_numpy((masks.reshape(n, -1).max(axis=1)).astype(np.int64))
    return ArrayDataset(
        images=torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8)),
        labels=labels,
        masks=torch.from_numpy(masks),
    )


def make_seg_federation(
    n_sites: int = 3, *, n: int = 24, size: int = 16, seed: int = 0, external: bool = True
) -> Federation:
    sites = tuple(
        Site.from_dataset(
            f"site{i}", make_seg_site_data(n + 4 * i, size=size, seed=seed + i), seed=i
        )
        for i in range(n_sites)
    )
    ext = None
    if external:
        data = make_seg_site_data(12, size=size, seed=seed + 100)
        ext = Site("external", data.subset([]), data)
    return Federation(sites, ext)


@pytest.fixture
def seg_federation() -> Federation:
    return make_seg_federation()


def make_seg_volume_federation(
    n_sites: int = 2, *, n: int = 12, side: int = 16, seed: int = 0
) -> Federation:
    """Volumes (N, 1, D, H, W) with a bright cube in every other case, the cube as its mask."""
    sites = []
    for s in range(n_sites):
        rng = np.random.default_rng(seed + s)
        vols = rng.normal(90, 20, size=(n, 1, side, side, side))
        masks = np.zeros((n, side, side, side), dtype=np.uint8)
        edge = side // 4
        for i in range(1, n, 2):
            z, y, x = rng.integers(0, side - edge, size=3)
            masks[i, z : z + edge, y : y + edge, x : x + edge] = 1
        vols[:, 0][masks == 1] += 80
        data = ArrayDataset(
            images=torch.from_numpy(np.clip(vols, 0, 255).astype(np.uint8)),
            labels=torch.from_numpy(masks.reshape(n, -1).max(axis=1).astype(np.int64)),
            masks=torch.from_numpy(masks),
        )
        sites.append(Site.from_dataset(f"site{s}", data, seed=s))
    return Federation(tuple(sites))


_SESSION_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test (or a module fixture) that pins torch to one thread must not change the arithmetic
    of later tests: the reduction order, and so the last bits, depend on the thread count. Every
    test ends with the session's thread count back."""
    yield
    if torch.get_num_threads() != _SESSION_THREADS:
        torch.set_num_threads(_SESSION_THREADS)


@pytest.fixture
def one_thread():
    """Tiny models: thread hand-off costs more than it saves, and one thread is fair to the
    neighbours on 2 cores. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``;
    ``_restore_torch_threads`` puts the session's count back after the test."""
    torch.set_num_threads(1)
    yield
