"""The synthetic H&E histology federation: shapes, determinism, cache, labels vs masks, morphology,
site effects, Beer-Lambert rendering, stain normalisation and the preview.

Tiny federations (8-10 tiles a site, 32 px) and single sites of a few dozen tiles keep the whole
file to a few seconds.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import medfed.data.synthetic.histology as hist
from medfed.data.site import ArrayDataset, Federation, Site
from medfed.data.stain import concentrations, optical_density
from medfed.data.synthetic.histology import (
    DEFAULT_EXTERNAL,
    DEFAULT_SITES,
    GENERATOR_VERSION,
    PUBLIC_SITES,
    TUMOUR_LABEL_FRACTION,
    HistologyCohort,
    HistologyOptions,
    HistologySiteProfile,
    generate_histology_site,
    synthesize_histology_federation,
)
from medfed.data.synthetic.histology_sites import CANONICAL_E, CANONICAL_H
from medfed.data.synthetic.preview import write_preview

SITES = {p.name: p for p in (*DEFAULT_SITES, DEFAULT_EXTERNAL)}
TINY = HistologyOptions(image_size=32, tiles_scale=0.01)


def clean(name: str, n: int, **changes: Any) -> HistologySiteProfile:
    """A site's tissue and stains, straight out of Beer-Lambert: no blur, noise or JPEG."""
    base = dataclasses.replace(SITES[name], n_tiles=n, blur=0.0, noise=0.0, jpeg_quality=None)
    return dataclasses.replace(base, **changes)


def everything(site: Site) -> ArrayDataset:
    """All of a site's tiles (train and val)."""
    return ArrayDataset.concat([d for d in (site.train, site.val) if len(d)])


def masks(data: ArrayDataset) -> torch.Tensor:
    assert data.masks is not None
    return data.masks


def all_sites(fed: Federation) -> list[Site]:
    """Training sites, then the external one (which these federations always have)."""
    assert fed.external is not None
    return [*fed.sites, fed.external]


def external_profile(opts: HistologyOptions) -> HistologySiteProfile:
    ext = opts.profiles()[1]
    assert ext is not None
    return ext


@pytest.fixture(scope="module")
def tiny_fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return synthesize_histology_federation(TINY, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def clean_site() -> tuple[ArrayDataset, dict[str, np.ndarray]]:
    """48 tiles of site-A at 64 px with no scanner degradation: morphology and optics checks."""
    return generate_histology_site(clean("site-A", 48), image_size=64, seed=3)


# ------------------------------------------------------------------------------ configuration


def test_default_profiles() -> None:
    assert [p.name for p in DEFAULT_SITES] == ["site-A", "site-B", "site-C", "site-D", "site-E"]
    assert DEFAULT_EXTERNAL.name == "site-F"
    assert len({p.n_tiles for p in DEFAULT_SITES}) == 5
    assert len({p.prevalence for p in DEFAULT_SITES}) == 5
    assert len({(p.stain_h, p.stain_e, p.h_scale, p.e_scale) for p in SITES.values()}) == 6
    assert all(240 <= p.background <= 255 for p in SITES.values())
    # The external lab's chemistry is unseen: its haematoxylin is far from every training site's.
    for p in DEFAULT_SITES:
        cos = float(np.dot(p.stain_h, DEFAULT_EXTERNAL.stain_h))
        assert np.degrees(np.arccos(min(cos, 1.0))) > 5.0


def test_options_validation_and_scaling() -> None:
    with pytest.raises(ValidationError, match="multiple of 16"):
        HistologyOptions(image_size=40)
    with pytest.raises(ValidationError):
        HistologyOptions(typo=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        TINY.seed = 2  # type: ignore[misc]  # frozen
    assert all(f.description for f in HistologyOptions.model_fields.values())
    sites, ext = HistologyOptions(tiles_scale=0.001, num_sites=2).profiles()
    assert [p.name for p in sites] == ["site-A", "site-B"]
    assert all(p.n_tiles == 8 for p in sites) and external_profile(TINY).n_tiles == 8  # floor
    assert HistologyOptions(external=False).profiles()[1] is None
    assert HistologyOptions(tiles_scale=0.5).profiles()[0][0].n_tiles == 500
    with pytest.raises(ValueError, match="prevalence"):
        HistologySiteProfile("x", 10, 1.0)


def test_public_cohort_is_disjoint_from_the_federation(tmp_path: Path) -> None:
    # Pretraining data must not be the private distribution under another name: other stains
    # and scanners, other site names (so other random streams), and never the external site.
    with pytest.raises(ValidationError, match="no external site"):
        HistologyOptions(cohort="public")
    opts = HistologyOptions(cohort=HistologyCohort.PUBLIC, external=False, tiles_scale=0.01)
    sites, ext = opts.profiles()
    assert ext is None and [p.name for p in sites] == [p.name for p in PUBLIC_SITES]
    private = {(p.stain_h, p.stain_e) for p in SITES.values()}
    for p in PUBLIC_SITES:
        assert (p.stain_h, p.stain_e) not in private
        # A dye pair no hospital's lab produces: further from each than its slides vary.
        jitter = max(q.stain_jitter_deg for q in SITES.values())
        for q in SITES.values():
            angles = [np.degrees(np.arccos(min(float(np.dot(a, b)), 1.0)))
                      for a, b in ((p.stain_h, q.stain_h), (p.stain_e, q.stain_e))]  # fmt: skip
            assert max(angles) > jitter, (p.name, q.name, angles)
    fed = synthesize_histology_federation(
        opts.model_copy(update={"image_size": 32}), cache_dir=tmp_path
    )
    assert fed.names == ["public-1", "public-2"] and fed.external is None
    tiles = everything(fed.sites[0])
    assert set(tiles.labels.tolist()) == {0, 1} and masks(tiles).any()
    private_a = synthesize_histology_federation(TINY, cache_dir=tmp_path).sites[0]
    assert not torch.equal(everything(private_a).images[:4], tiles.images[:4])


# ------------------------------------------------------------------------------ federation


def test_shapes_dtypes_splits_and_ids(tiny_fed: Federation) -> None:
    profiles, _ = TINY.profiles()
    assert tiny_fed.names == [p.name for p in profiles]
    for site, p in zip(tiny_fed.sites, profiles, strict=True):
        data = everything(site)
        assert len(data) == p.n_tiles
        assert data.images.dtype == torch.uint8 and tuple(data.images.shape[1:]) == (3, 32, 32)
        assert data.masks is not None and data.masks.dtype == torch.uint8
        assert tuple(data.masks.shape[1:]) == (32, 32) and int(data.masks.max()) == 1
        assert data.labels.dtype == torch.int64
        assert all(re.fullmatch(rf"{p.name}-\d{{5}}", c) for c in data.case_ids)
        for part in (site.train, site.val):  # stratified: both classes on both sides
            assert set(part.labels.tolist()) == {0, 1}
        assert abs(len(site.val) - 0.2 * p.n_tiles) <= 2
        assert site.meta["role"] == "train" and site.meta["generator_version"] == GENERATOR_VERSION
    ext = tiny_fed.external
    assert ext is not None and ext.name == "site-F" and len(ext.train) == 0
    assert len(ext.val) == external_profile(TINY).n_tiles and ext.meta["role"] == "external"
    assert ext.train.images.shape[1:] == ext.val.images.shape[1:]


def test_generation_is_deterministic_and_thread_independent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = dataclasses.replace(SITES["site-C"], n_tiles=40)  # two chunks
    monkeypatch.setenv("MEDFED_SYNTH_THREADS", "1")
    a, fa = generate_histology_site(p, image_size=32, seed=5)
    monkeypatch.setenv("MEDFED_SYNTH_THREADS", "2")
    b, fb = generate_histology_site(p, image_size=32, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(masks(a), masks(b))
    assert torch.equal(a.labels, b.labels) and a.case_ids == b.case_ids
    np.testing.assert_array_equal(fa["stain_matrix"], fb["stain_matrix"])
    c, _ = generate_histology_site(p, image_size=32, seed=6)
    assert not torch.equal(a.images, c.images)


def test_adding_a_site_changes_no_other(tmp_path) -> None:
    two = synthesize_histology_federation(
        TINY.model_copy(update={"num_sites": 2}), cache_dir=tmp_path / "a"
    )
    three = synthesize_histology_federation(
        TINY.model_copy(update={"num_sites": 3}), cache_dir=tmp_path / "b"
    )
    for s2, s3 in zip(two.sites, three.sites[:2], strict=True):
        assert torch.equal(s2.train.images, s3.train.images) and s2.val.case_ids == s3.val.case_ids


def test_second_call_loads_from_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = TINY.model_copy(update={"num_sites": 2})
    first = synthesize_histology_federation(opts, cache_dir=tmp_path)
    assert len(list((tmp_path / "histology").glob("*.npz"))) == 3

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("generator re-run despite a warm cache")

    monkeypatch.setattr(hist, "generate_histology_site", boom)
    second = synthesize_histology_federation(opts, cache_dir=tmp_path)
    for s1, s2 in zip(all_sites(first), all_sites(second), strict=True):
        for d1, d2 in ((s1.train, s2.train), (s1.val, s2.val)):
            assert torch.equal(d1.images, d2.images) and torch.equal(masks(d1), masks(d2))
            assert torch.equal(d1.labels, d2.labels) and d1.case_ids == d2.case_ids
    for change in ({"seed": 1}, {"image_size": 48}):  # any parameter change is a miss
        with pytest.raises(AssertionError, match="warm cache"):
            synthesize_histology_federation(opts.model_copy(update=change), cache_dir=tmp_path)


# ------------------------------------------------------------------------------ labels & masks


def test_labels_follow_the_masks_and_prevalence_is_exact() -> None:
    p = dataclasses.replace(SITES["site-D"], n_tiles=80)
    data, features = generate_histology_site(p, image_size=32, seed=0)
    assert data.masks is not None
    fraction = data.masks.numpy().reshape(len(data), -1).mean(axis=1)
    np.testing.assert_array_equal(data.labels.numpy(), fraction >= TUMOUR_LABEL_FRACTION)
    np.testing.assert_allclose(features["tumour_fraction"], fraction)
    assert int(data.labels.sum()) == p.n_positive() == round(0.25 * 80)
    negatives = fraction[data.labels.numpy() == 0]
    # Isolated sub-threshold tumour foci exist: label 0, mask not empty.
    assert (negatives > 0).any()
    assert fraction[data.labels.numpy() == 1].min() > 0.1


def test_same_tissue_at_any_resolution() -> None:
    p = dataclasses.replace(SITES["site-A"], n_tiles=12)
    small, _ = generate_histology_site(p, image_size=32, seed=1)
    large, _ = generate_histology_site(p, image_size=64, seed=1)
    assert torch.equal(small.labels, large.labels)
    down = masks(large).float().reshape(12, 32, 2, 32, 2).mean(dim=(2, 4)) >= 0.5
    m = masks(small).bool()
    iou = (down & m).sum() / (down | m).sum().clamp(min=1)
    assert float(iou) > 0.85


def test_tumour_has_denser_larger_darker_nuclei(clean_site) -> None:
    """Inside the same tiles, tumour pixels carry more haematoxylin and more nuclear area."""
    data, features = clean_site
    p = clean("site-A", 48)
    od = optical_density(data.images.numpy(), io=p.background)
    wins, tum_h, norm_h, tum_nuc, norm_nuc = 0, [], [], [], []
    for i in np.flatnonzero(data.labels.numpy()):
        h = concentrations(od[i], features["stain_matrix"][i])[0]
        mask = masks(data)[i].numpy().astype(bool)
        tissue = od[i].sum(axis=0) > 0.3  # not glass, not lumen
        tumour, normal = mask & tissue, ~mask & tissue
        if tumour.sum() < 50 or normal.sum() < 50:
            continue
        tum_h.append(h[tumour].mean())
        norm_h.append(h[normal].mean())
        tum_nuc.append((h[tumour] > 0.6).mean())
        norm_nuc.append((h[normal] > 0.6).mean())
        wins += tum_h[-1] > norm_h[-1]
    assert len(tum_h) >= 10
    assert wins >= 0.9 * len(tum_h)
    assert np.mean(tum_h) > 1.5 * np.mean(norm_h)
    assert np.mean(tum_nuc) > 2.0 * np.mean(norm_nuc)


def test_beer_lambert_od_lies_in_the_stain_plane(clean_site) -> None:
    """Before blur and JPEG, -log(I / I0) is in the span of the tile's two stain vectors."""
    data, features = clean_site
    p = clean("site-A", 48)
    od = optical_density(data.images.numpy(), io=p.background)
    own: list[np.ndarray] = []
    other: list[np.ndarray] = []
    wrong = SITES["site-F"].stain_matrix
    for i in range(len(data)):
        px = od[i].reshape(3, -1)
        px = px[:, np.linalg.norm(px, axis=0) > 0.25]  # rounding to uint8 dominates fainter pixels
        for matrix, out in ((features["stain_matrix"][i], own), (wrong, other)):
            q, _ = np.linalg.qr(matrix)
            resid = px - q @ (q.T @ px)
            out.append(np.linalg.norm(resid, axis=0) / np.linalg.norm(px, axis=0))
    own_r, other_r = np.concatenate(own), np.concatenate(other)
    assert np.median(own_r) < 0.005 and np.percentile(own_r, 99.9) < 0.03
    assert np.median(other_r) > 5 * np.median(own_r)  # the check can tell stains apart


# ------------------------------------------------------------------------------ site effects


def _hf_energy(images: torch.Tensor) -> float:
    """Mean squared Laplacian of the grey image: high-frequency energy."""
    g = images.float().mean(dim=1)
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return float(lap.square().mean())


def test_blurrier_scanner_has_less_high_frequency_energy() -> None:
    sharp, _ = generate_histology_site(clean("site-B", 16), image_size=64, seed=0)
    soft, _ = generate_histology_site(clean("site-B", 16, blur=1.3), image_size=64, seed=0)
    assert _hf_energy(soft.images) < 0.3 * _hf_energy(sharp.images)
    # ... and across default sites, with their own tissue: site-E (blur 1.3) vs site-A (sharp).
    a, _ = generate_histology_site(
        dataclasses.replace(SITES["site-A"], n_tiles=24), image_size=64, seed=0
    )
    e, _ = generate_histology_site(
        dataclasses.replace(SITES["site-E"], n_tiles=24), image_size=64, seed=0
    )
    assert _hf_energy(e.images) < 0.5 * _hf_energy(a.images)


def test_jpeg_is_applied() -> None:
    raw, _ = generate_histology_site(clean("site-D", 8), image_size=32, seed=0)
    jpg, _ = generate_histology_site(clean("site-D", 8, jpeg_quality=40), image_size=32, seed=0)
    diff = (raw.images.float() - jpg.images.float()).abs().mean()
    assert 0.5 < float(diff) < 20
    assert torch.equal(masks(raw), masks(jpg))


def test_higher_prevalence_site_has_more_tumour_tiles(tiny_fed: Federation) -> None:
    def rate(name: str) -> float:
        return float(everything(tiny_fed.site(name)).labels.float().mean())

    assert SITES["site-C"].prevalence > SITES["site-D"].prevalence
    assert rate("site-C") > rate("site-D")
    big = [dataclasses.replace(SITES[n], n_tiles=200) for n in ("site-C", "site-D")]
    assert big[0].n_positive() == 120 and big[1].n_positive() == 50


def test_stain_profiles_change_colour_not_tissue() -> None:
    """Same tissue (same site name and seed), canonical stains vs the site's own."""
    canon, _ = generate_histology_site(
        clean("site-B", 16, stain_h=CANONICAL_H, stain_e=CANONICAL_E, h_scale=1.0, e_scale=1.0),
        image_size=32, seed=0,
    )  # fmt: skip
    own, _ = generate_histology_site(clean("site-B", 16), image_size=32, seed=0)
    assert torch.equal(masks(canon), masks(own))
    gap = (own.images.float().mean(dim=(0, 2, 3)) - canon.images.float().mean(dim=(0, 2, 3))).abs()
    assert float(gap.max()) > 5.0


def test_sites_have_distinct_mean_colours(tiny_fed: Federation) -> None:
    means = [everything(s).images.float().mean(dim=(0, 2, 3)) for s in all_sites(tiny_fed)]
    for i in range(len(means)):
        for j in range(i):
            assert float((means[i] - means[j]).abs().max()) > 2.0


# ------------------------------------------------------------------------------ stain normalisation


def test_stain_normalize_option_pulls_sites_together(tmp_path) -> None:
    opts = HistologyOptions(image_size=32, tiles_scale=0.03)
    raw = synthesize_histology_federation(opts, cache_dir=tmp_path)
    norm = synthesize_histology_federation(
        opts.model_copy(update={"stain_normalize": True}), cache_dir=tmp_path
    )
    assert len(list((tmp_path / "histology").glob("*.npz"))) == 6  # normalisation is not cached

    def spread(fed: Federation) -> float:
        means = torch.stack(
            [everything(s).images.float().mean(dim=(0, 2, 3)) for s in all_sites(fed)]
        )
        return float((means - means.mean(dim=0)).norm(dim=1).mean())

    assert spread(norm) < 0.6 * spread(raw)
    for a, b in zip(all_sites(raw), all_sites(norm), strict=True):
        assert b.meta["stain_normalized"] is True
        assert torch.equal(a.val.labels, b.val.labels) and torch.equal(masks(a.val), masks(b.val))
        assert a.val.images.shape == b.val.images.shape
        assert not torch.equal(a.val.images, b.val.images)


# ------------------------------------------------------------------------------ preview & sizes


def _lime_pixels(path) -> int:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return int(((rgb[..., 1] > 180) & (rgb[..., 0] < 120) & (rgb[..., 2] < 120)).sum())


def test_preview_shows_colour_tiles_with_mask_outlines(tiny_fed: Federation, tmp_path) -> None:
    with_masks = write_preview(tiny_fed, tmp_path / "a.png", per_site=4, class_names=("N", "T"))
    without = write_preview(tiny_fed, tmp_path / "b.png", per_site=4, outline_masks=False)
    assert _lime_pixels(with_masks) > 20  # H&E has no lime green: these are the outlines
    assert _lime_pixels(without) == 0


def test_larger_tiles_work() -> None:
    data, _ = generate_histology_site(
        dataclasses.replace(SITES["site-F"], n_tiles=4), image_size=128, seed=0
    )
    assert tuple(data.images.shape) == (4, 3, 128, 128)
    assert tuple(masks(data).shape) == (4, 128, 128)
