"""uint8 conversion: intensity, channels, resize modes, masks; values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.data.sources.errors import DataError
from medfed.data.sources.image import as_hwc, convert_images, convert_masks
from medfed.data.sources.options import ImageOptions


def test_minmax_of_16bit_ramp_is_exact() -> None:
    ramp = (np.arange(16, dtype=np.uint16) * 1000 + 500).reshape(4, 4)
    out = convert_images([ramp], ImageOptions(size=4, resize="stretch"), source="x")
    expected = np.rint((ramp - 500) / 15000 * 255).astype(np.uint8)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(out[0, 0].numpy(), expected)


def test_window_and_percentile_and_none() -> None:
    x = np.array([[-1000.0, 0.0], [40.0, 2000.0]])
    win = ImageOptions(size=2, resize="stretch", intensity="window", window=(40, 400))
    got = convert_images([x], win, source="x")[0, 0].numpy()
    lo = 40 - 200  # center - width/2 -> 0, center + width/2 -> 255
    expected = np.rint(np.clip((x - lo) / 400 * 255, 0, 255))
    np.testing.assert_array_equal(got, expected)
    none = convert_images([x], ImageOptions(size=2, resize="stretch", intensity="none"), source="x")
    np.testing.assert_array_equal(none[0, 0].numpy(), [[0, 0], [40, 255]])
    ramp = np.arange(1000, dtype=np.float64).reshape(25, 40)
    pct = ImageOptions(size=40, resize="pad", intensity="percentile", percentiles=(10, 90))
    got = convert_images([ramp], pct, source="x")[0, 0, 7:32].numpy().astype(float)
    lo_p, hi_p = np.percentile(ramp, [10, 90])
    np.testing.assert_allclose(got, np.rint(np.clip((ramp - lo_p) / (hi_p - lo_p) * 255, 0, 255)))


def test_constant_image_maps_to_zero_not_nan() -> None:
    out = convert_images([np.full((3, 3), 7.0)], ImageOptions(size=3, resize="stretch"), source="x")
    assert out.max() == 0


def test_rgb_to_gray_is_bt601_and_gray_to_rgb_repeats() -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[0, 0] = 0
    o = ImageOptions(size=2, resize="stretch", intensity="none", channels=1)
    got = convert_images([rgb], o, source="x")[0, 0, 1, 1].item()
    assert got == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    gray = np.arange(4, dtype=np.uint8).reshape(2, 2)
    o3 = ImageOptions(size=2, resize="stretch", intensity="none", channels=3)
    out = convert_images([gray], o3, source="x")
    assert out.shape == (1, 3, 2, 2)
    for c in range(3):
        np.testing.assert_array_equal(out[0, c].numpy(), gray)


def test_rgba_drops_alpha_and_bad_channel_count_is_data_error() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255
    assert as_hwc(rgba, source="f").shape == (2, 2, 3)
    with pytest.raises(DataError, match="f: cannot make 1 or 3 channels from 5"):
        as_hwc(np.zeros((2, 2, 5)), source="f")


def test_pad_keeps_aspect_crop_centres() -> None:
    wide = np.full((2, 4), 200, np.uint8)  # 2 x 4 -> pad to 4 x 4: rows 1..2 filled
    pad = convert_images([wide], ImageOptions(size=4, resize="pad", intensity="none"), source="x")
    np.testing.assert_array_equal(pad[0, 0].numpy(), [[0] * 4, [200] * 4, [200] * 4, [0] * 4])
    cols = np.arange(6, dtype=np.uint8)[None, :].repeat(3, 0) * 10  # 3 x 6 -> crop to 3 x 3
    crop = convert_images([cols], ImageOptions(size=3, resize="crop", intensity="none"), source="x")
    np.testing.assert_array_equal(crop[0, 0].numpy(), [[10, 20, 30]] * 3)


def test_masks_resize_nearest_keep_label_values() -> None:
    m = np.zeros((1, 4, 4), np.uint8)
    m[0, :2, :2] = 3
    out = convert_masks(m, ImageOptions(size=8, resize="stretch"), source="m")
    assert set(torch.unique(out).tolist()) == {0, 3}
    assert out[0, :4, :4].eq(3).all() and out[0, 4:].eq(0).all()
    with pytest.raises(DataError, match="m: mask values"):
        convert_masks(np.full((1, 2, 2), 300), ImageOptions(size=2), source="m")
