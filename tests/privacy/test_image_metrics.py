"""SSIM / PSNR against scikit-image, and Hungarian matching against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medfed.privacy.image_metrics import match, psnr, score, ssim, ssim_matrix


def _skimage_ssim(a: np.ndarray, b: np.ndarray, **kw: object) -> float:
    return float(
        structural_similarity(
            a,
            b,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            **kw,
        )  # fmt: skip
    )


@st.composite
def image_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Two images in [0, 1]: independent, or the second a noisy / scaled copy of the first."""
    h = draw(st.integers(11, 40))
    w = draw(st.integers(11, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.random((h, w))
    kind = draw(st.sampled_from(["independent", "noisy", "scaled", "flat"]))
    if kind == "independent":
        b = rng.random((h, w))
    elif kind == "noisy":
        b = np.clip(a + rng.normal(0, draw(st.floats(0.001, 0.5)), (h, w)), 0, 1)
    elif kind == "scaled":
        b = a * draw(st.floats(0.0, 1.0))
    else:
        b = np.full((h, w), draw(st.floats(0.0, 1.0)))
    return a, b


@settings(max_examples=60, deadline=None)
@given(image_pairs())
def test_ssim_and_psnr_match_skimage(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert ssim(ta, tb) == pytest.approx(_skimage_ssim(a, b), abs=1e-5)
    # float32 inputs agree too (computed in float64 internally)
    assert ssim(ta.float(), tb.float()) == pytest.approx(_skimage_ssim(a, b), abs=1e-5)
    ref = peak_signal_noise_ratio(a, b, data_range=1.0)
    assert psnr(ta, tb) == pytest.approx(ref, abs=1e-5)


def test_multichannel_ssim_is_the_channel_mean_like_skimage() -> None:
    rng = np.random.default_rng(3)
    a = rng.random((3, 20, 24))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ref = _skimage_ssim(a, b, channel_axis=0)
    assert ssim(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, abs=1e-5)


def test_identical_images() -> None:
    a = torch.rand(1, 16, 16)
    assert ssim(a, a) == pytest.approx(1.0)
    assert math.isinf(psnr(a, a))
    assert score(a[None], a[None])[0].to_json()["psnr"] is None  # JSON has no infinity


def test_small_or_mismatched_images_are_errors() -> None:
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.rand(8, 8), torch.rand(8, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(torch.rand(16, 16), torch.rand(16, 17))


def test_ssim_matrix_entries() -> None:
    a, b = torch.rand(3, 1, 16, 16), torch.rand(2, 1, 16, 16)
    m = ssim_matrix(a, b)
    assert m.shape == (3, 2)
    assert m[2, 1] == pytest.approx(ssim(a[2], b[1]), abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_match_is_the_best_permutation(n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    originals = torch.rand(n, 1, 12, 12, generator=gen)
    # Reconstructions: shuffled noisy copies mixed with unrelated images.
    perm = torch.randperm(n, generator=gen)
    noise = torch.rand(n, 1, 1, 1, generator=gen)
    recons = (originals[perm] + noise * torch.randn(n, 1, 12, 12, generator=gen)).clamp(0, 1)
    order = match(originals, recons)
    assert sorted(order) == list(range(n))
    m = ssim_matrix(originals, recons)
    best = max(sum(m[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    assert sum(m[i, order[i]] for i in range(n)) == pytest.approx(best, abs=1e-12)


def test_score_pairs_shuffled_copies() -> None:
    originals = torch.rand(4, 1, 16, 16)
    recons = originals[[2, 0, 3, 1]]
    scores = score(originals, recons)
    assert [s.recon_index for s in scores] == [1, 3, 0, 2]
    assert all(s.ssim == pytest.approx(1.0) for s in scores)
