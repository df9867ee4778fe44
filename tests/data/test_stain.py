"""Macenko stain normalisation: recovery of known stains, normalisation, degenerate input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.data.stain import (
    REFERENCE_MAX_CONC,
    REFERENCE_STAIN_MATRIX,
    StainEstimationError,
    concentrations,
    estimate_io,
    macenko_normalize,
    macenko_stain_matrix,
    optical_density,
    render_stains,
)
from medfed.data.synthetic.histology_sites import BLUE, GREEN, RED, rotate_toward


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between corresponding columns of two (3, 2) matrices."""
    cos = (a * b).sum(axis=0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _tissue_conc(seed: int, size: int = 64, n: int = 1) -> np.ndarray:
    """(n, 2, size, size) H&E concentrations: nuclei, stroma, mixtures and glass."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=(n, size, size), p=[0.3, 0.4, 0.15, 0.15])
    h = np.select(
        [kind == 0, kind == 1, kind == 2],
        [rng.uniform(0.5, 1.5, kind.shape), rng.uniform(0, 0.05, kind.shape),
         rng.uniform(0.2, 0.8, kind.shape)],
        0.0,
    )  # fmt: skip
    e = np.select(
        [kind == 0, kind == 1, kind == 2],
        [rng.uniform(0, 0.1, kind.shape), rng.uniform(0.3, 1.0, kind.shape),
         rng.uniform(0.2, 0.6, kind.shape)],
        0.0,
    )  # fmt: skip
    return np.stack([h, e], axis=1).astype(np.float32)


def _render(
    conc: np.ndarray, matrix: np.ndarray, io: float = 240.0, noise: float = 0.5
) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = render_stains(conc, matrix, io=io)
    img = img + noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _matrix(h_deg: float, h_to: tuple[float, float, float], e_deg: float,
            e_to: tuple[float, float, float]) -> np.ndarray:  # fmt: skip
    h = rotate_toward(tuple(REFERENCE_STAIN_MATRIX[:, 0]), h_deg, h_to)
    e = rotate_toward(tuple(REFERENCE_STAIN_MATRIX[:, 1]), e_deg, e_to)
    return np.stack([h, e], axis=1)


DIRECTIONS = st.sampled_from([RED, GREEN, BLUE])


# ------------------------------------------------------------------------------ estimation


def test_recovers_reference_stains_from_a_beer_lambert_image() -> None:
    img = _render(_tissue_conc(0)[0], REFERENCE_STAIN_MATRIX)
    assert img.shape == (3, 64, 64)
    est = macenko_stain_matrix(img)
    assert est.shape == (3, 2)
    assert np.allclose(np.linalg.norm(est, axis=0), 1.0)
    assert _angles(est, REFERENCE_STAIN_MATRIX).max() < 3.0


@settings(max_examples=15, deadline=None)
@given(
    h_deg=st.floats(0.0, 15.0), h_to=DIRECTIONS, e_deg=st.floats(0.0, 15.0), e_to=DIRECTIONS,
    seed=st.integers(0, 1000),
)  # fmt: skip
def test_recovers_perturbed_stains_within_a_few_degrees(
    h_deg: float, h_to: tuple[float, float, float], e_deg: float,
    e_to: tuple[float, float, float], seed: int,
) -> None:  # fmt: skip
    true = _matrix(h_deg, h_to, e_deg, e_to)
    est = macenko_stain_matrix(_render(_tissue_conc(seed, size=48, n=2), true))
    assert _angles(est, true).max() < 3.0  # and H / E are not swapped


def test_estimate_io_finds_the_glass_level() -> None:
    for io in (240.0, 252.0):
        img = _render(_tissue_conc(1)[0], REFERENCE_STAIN_MATRIX, io=io)
        assert abs(estimate_io(img) - io) < 2.0


def test_concentrations_invert_rendering() -> None:
    conc = _tissue_conc(2, size=16)
    od = -np.log(render_stains(conc, REFERENCE_STAIN_MATRIX, io=240.0) / 240.0)
    back = concentrations(od, REFERENCE_STAIN_MATRIX)
    assert back.shape == conc.shape
    np.testing.assert_allclose(back, conc, atol=1e-4)


# ------------------------------------------------------------------------------ normalisation


def test_normalisation_moves_perturbed_tiles_toward_reference_rendering() -> None:
    conc = _tissue_conc(3, n=4)
    # The reference rendering: same tissue, reference stains, maxima at the reference ones.
    scale = np.asarray(REFERENCE_MAX_CONC) / np.percentile(conc, 99, axis=(0, 2, 3))
    ref = _render(conc * scale[None, :, None, None].astype(np.float32), REFERENCE_STAIN_MATRIX)
    strong = conc * np.array([1.3, 0.8], dtype=np.float32)[None, :, None, None]
    perturbed = _render(strong, _matrix(12.0, BLUE, 10.0, RED))
    out = macenko_normalize(perturbed)
    assert out.shape == perturbed.shape and out.dtype == np.uint8

    def mae(a: np.ndarray) -> float:
        return float(np.abs(a.astype(float) - ref.astype(float)).mean())

    def od_gap(a: np.ndarray) -> float:
        return float(
            np.abs(
                optical_density(a).mean(axis=(0, 2, 3)) - optical_density(ref).mean(axis=(0, 2, 3))
            ).sum()
        )

    assert mae(out) < 0.4 * mae(perturbed)
    assert od_gap(out) < 0.3 * od_gap(perturbed)
    colour = np.abs(out.mean(axis=(0, 2, 3)) - ref.mean(axis=(0, 2, 3))).max()
    assert colour < 3.0 < np.abs(perturbed.mean(axis=(0, 2, 3)) - ref.mean(axis=(0, 2, 3))).max()


def test_normalisation_is_nearly_idempotent() -> None:
    img = _render(_tissue_conc(4, n=3), _matrix(8.0, GREEN, 6.0, BLUE))
    once = macenko_normalize(img)
    twice = macenko_normalize(once)
    assert np.abs(once.astype(float) - twice.astype(float)).mean() < 1.5
    assert _angles(macenko_stain_matrix(once), REFERENCE_STAIN_MATRIX).max() < 3.0


def test_torch_in_torch_out_and_single_images() -> None:
    img = _render(_tissue_conc(5, n=2), REFERENCE_STAIN_MATRIX)
    out = macenko_normalize(torch.from_numpy(img))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out.numpy(), macenko_normalize(img))
    single = macenko_normalize(img[0])
    assert single.shape == img[0].shape and single.dtype == np.uint8


# ------------------------------------------------------------------------------ degenerate input


@pytest.mark.parametrize("level", [0, 240, 255])
def test_blank_tiles_come_back_unchanged(level: int) -> None:
    blank = np.full((2, 3, 32, 32), level, dtype=np.uint8)
    with pytest.raises(StainEstimationError):
        macenko_stain_matrix(blank)  # no stained pixel, or (black) no second direction
    out = macenko_normalize(blank)
    np.testing.assert_array_equal(out, blank)
    assert out is not blank
    np.testing.assert_array_equal(macenko_normalize(blank, per_image=True), blank)


def test_nearly_blank_and_single_stain_tiles_come_back_unchanged() -> None:
    rng = np.random.default_rng(0)
    nearly = np.clip(238 + rng.normal(0, 1.0, (3, 32, 32)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(macenko_normalize(nearly), nearly)
    conc = np.zeros((2, 32, 32), np.float32)
    conc[1] = rng.uniform(0.3, 1.0, (32, 32))  # eosin only: no second stain direction
    eosin = _render(conc, REFERENCE_STAIN_MATRIX, noise=0.0)
    with pytest.raises(StainEstimationError, match="one stain"):
        macenko_stain_matrix(eosin)
    np.testing.assert_array_equal(macenko_normalize(eosin), eosin)


def test_per_image_mode_leaves_blank_images_and_normalises_the_rest() -> None:
    tissue = _render(_tissue_conc(6, n=1), _matrix(10.0, RED, 0.0, RED))
    batch = np.concatenate([tissue, np.full_like(tissue, 245)])
    out = macenko_normalize(batch, per_image=True)
    np.testing.assert_array_equal(out[1], batch[1])
    np.testing.assert_array_equal(out[0], macenko_normalize(tissue)[0])
    assert not np.array_equal(out[0], batch[0])


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        macenko_normalize(np.zeros((3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="RGB"):
        macenko_normalize(np.zeros((1, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        macenko_normalize(np.zeros((3, 8, 8), dtype=np.uint8), target_matrix=np.eye(3))
