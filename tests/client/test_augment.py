"""The acquisition policy against hand-made references: identity at zero ranges, scipy's blur,
masks that move with their images, and the config's spellings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy.ndimage import gaussian_filter

from medfed.client.augment import AcquisitionShift, Augment, acquisition_shift
from medfed.client.train import TrainOptions, train_local
from medfed.data.site import ArrayDataset

STILL = AcquisitionShift(
    log_gamma=0.0, log_contrast=0.0, brightness=0.0, p_blur=0.0, p_resample=0.0, zoom=0.0,
    shift=0.0,
)  # fmt: skip


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 4, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=_gen(seed))


def test_zero_ranges_leave_the_batch_as_it_was() -> None:
    x = _images()
    out, mask = acquisition_shift(x.clone(), generator=_gen(), shift=STILL)
    assert mask is None
    torch.testing.assert_close(out, x.clamp_min(1e-6), atol=1e-6, rtol=0)


def test_gamma_is_drawn_per_image_from_the_generator() -> None:
    x = _images(b=3)
    shift = AcquisitionShift(log_gamma=0.4, log_contrast=0.0, brightness=0.0, p_blur=0.0,
                             p_resample=0.0, zoom=0.0, shift=0.0)  # fmt: skip
    out, _ = acquisition_shift(x.clone(), generator=_gen(5), shift=shift)
    gamma = torch.exp(-0.4 + 0.8 * torch.rand(3, generator=_gen(5)))  # the first draw
    expected = x.clamp_min(1e-6) ** gamma.view(3, 1, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(gamma[0], gamma[1])


def test_blur_matches_scipy_gaussian_filter() -> None:
    x = _images(b=2, c=3, size=20)
    shift = AcquisitionShift(log_gamma=0.0, log_contrast=0.0, brightness=0.0, p_blur=1.0,
                             blur_sigma=(1.0, 1.0), p_resample=0.0, zoom=0.0, shift=0.0)  # fmt: skip
    out, _ = acquisition_shift(x.clone(), generator=_gen(), shift=shift)
    ref = gaussian_filter(
        x.clamp_min(1e-6).numpy(), sigma=(0, 0, 1.0, 1.0), mode="nearest", truncate=3.0
    )
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


def test_contrast_and_brightness_keep_pixels_in_range() -> None:
    x = _images(b=8)
    out, _ = acquisition_shift(x, generator=_gen(1), shift=AcquisitionShift(brightness=0.5))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.shape == x.shape


def test_the_mask_moves_with_its_image_and_keeps_its_labels() -> None:
    mask = torch.zeros(6, 32, 32, dtype=torch.long)
    mask[:, 8:20, 10:26] = 1
    mask[:, 22:28, 4:12] = 2
    image = (mask.float() / 2.0)[:, None]
    geometric = AcquisitionShift(log_gamma=0.0, log_contrast=0.0, brightness=0.0, p_blur=0.0,
                                 p_resample=0.0, zoom=0.3, shift=0.2)  # fmt: skip
    out, moved = acquisition_shift(image, mask, generator=_gen(3), shift=geometric)
    assert moved is not None and moved.dtype == torch.long and moved.shape == mask.shape
    assert set(moved.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(moved, mask)  # it did move
    # the image's own labels, read back by rounding, agree with the moved mask off the edges
    agree = (torch.round(out[:, 0] * 2).long() == moved).float().mean()
    assert agree > 0.97


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5))
def test_same_seed_same_batch(seed: int, b: int) -> None:
    x = _images(b=b, seed=seed % 1000)
    one, _ = acquisition_shift(x.clone(), generator=_gen(seed))
    two, _ = acquisition_shift(x.clone(), generator=_gen(seed))
    torch.testing.assert_close(one, two, atol=0, rtol=0)
    assert torch.isfinite(one).all() and one.min() >= 0 and one.max() <= 1


def test_volumes_are_refused_naming_the_option() -> None:
    with pytest.raises(ValueError, match="train.augment 'acquisition'"):
        acquisition_shift(torch.rand(1, 1, 4, 8, 8), generator=_gen())


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="resample_scale"):
        AcquisitionShift(resample_scale=(0.0, 1.0))


@pytest.mark.parametrize(
    ("given_value", "policy"),
    [(True, Augment.FLIP), (False, Augment.NONE), ("acquisition", Augment.ACQUISITION)],
)
def test_config_spellings(given_value: object, policy: Augment) -> None:
    assert TrainOptions(augment=given_value).augment is policy  # type: ignore[arg-type]


def test_a_typo_names_the_choices() -> None:
    with pytest.raises(ValidationError, match="acquisition"):
        TrainOptions(augment="acquisiton")  # type: ignore[arg-type]


@pytest.mark.parametrize("segment", [False, True])
def test_training_with_the_policy_is_reproducible(segment: bool) -> None:
    from medfed.types import Task

    g = _gen(0)
    images = (torch.rand(16, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(16) % 2
    masks = (images[:, 0] > 128).to(torch.uint8) if segment else None
    data = ArrayDataset(images, labels, masks=masks)
    task = Task.SEGMENTATION if segment else Task.CLASSIFICATION
    opts = TrainOptions(epochs=2, batch_size=8, augment="acquisition")  # type: ignore[arg-type]

    def trained() -> list[torch.Tensor]:
        torch.manual_seed(0)
        if segment:
            net: torch.nn.Module = torch.nn.Conv2d(1, 2, 3, padding=1)
        else:
            net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
        res = train_local(net, data, opts, generator=_gen(7), device=torch.device("cpu"), task=task)
        assert math.isfinite(res.loss) and res.num_steps == 4
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(trained(), trained(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
