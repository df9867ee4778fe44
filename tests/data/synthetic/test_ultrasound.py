"""The synthetic ultrasound federation: counts, determinism, site effects, labels, masks, cache.

Small federations (scale 0.02-0.05, 32-48 px) keep the whole file to a few seconds; the full
default counts are checked on the configuration and the label model, which need no pixels.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

import medfed.data.synthetic.ultrasound as us
from medfed.data.site import Federation
from medfed.data.synthetic.preview import write_preview
from medfed.data.synthetic.ultrasound import (
    DEFAULT_EXTERNAL,
    DEFAULT_SITES,
    ECHOGENICITY,
    FOCI,
    MARGIN,
    SiteProfile,
    UltrasoundOptions,
    federation_oracle_auc,
    generate_site,
    synthesize_federation,
)
from medfed.data.synthetic.ultrasound_sites import sample_site_cases

SITES = {p.name: p for p in (*DEFAULT_SITES, DEFAULT_EXTERNAL)}


def small(name: str, n_benign: int = 10, n_malignant: int = 10) -> SiteProfile:
    return dataclasses.replace(SITES[name], n_benign=n_benign, n_malignant=n_malignant)


@pytest.fixture(scope="module")
def tiny_fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    opts = UltrasoundOptions(image_size=48, scale=0.03)
    return synthesize_federation(opts, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def sample_site1() -> tuple:
    """A moderately sized sample of one site for the image-statistics checks."""
    return generate_site(small("site1", 120, 120), image_size=48, seed=3)


# ------------------------------------------------------------------------------ configuration


def test_default_counts_mirror_the_reference_study() -> None:
    assert len(DEFAULT_SITES) == 6
    assert sum(p.n for p in DEFAULT_SITES) == 8457
    assert sum(p.n_malignant for p in DEFAULT_SITES) == 5375
    assert sum(p.n_benign for p in DEFAULT_SITES) == 3082
    assert len({p.n for p in DEFAULT_SITES}) == 6  # unequal site sizes
    assert len({round(p.n_malignant / p.n, 2) for p in DEFAULT_SITES}) >= 5  # differing prevalence
    assert (DEFAULT_EXTERNAL.n_benign, DEFAULT_EXTERNAL.n_malignant) == (50, 50)
    assert DEFAULT_EXTERNAL.name not in {p.name for p in DEFAULT_SITES}


def test_external_scanner_profile_is_unseen_in_training() -> None:
    seen = {(p.probe, p.gain, p.speckle_grain) for p in DEFAULT_SITES}
    ext = DEFAULT_EXTERNAL
    assert (ext.probe, ext.gain, ext.speckle_grain) not in seen
    assert ext.gain > max(p.gain for p in DEFAULT_SITES)
    assert ext.speckle_grain > max(p.speckle_grain for p in DEFAULT_SITES)


def test_options_scale_and_validation() -> None:
    sites, ext = UltrasoundOptions(scale=0.01, num_sites=3).profiles()
    assert [p.name for p in sites] == ["site1", "site2", "site3"]
    assert all(p.n_benign >= 4 and p.n_malignant >= 4 for p in (*sites, ext))
    assert sites[0].n_malignant == round(1650 * 0.01)
    assert UltrasoundOptions(external=False).profiles()[1] is None
    with pytest.raises(ValueError):
        UltrasoundOptions(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        UltrasoundOptions(num_sites=7)


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_other_seed_other_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    p = small("site3", 6, 6)
    a, fa = generate_site(p, image_size=40, seed=7)
    monkeypatch.setenv("MEDFED_SYNTH_THREADS", "1")  # threads change speed, never bytes
    b, fb = generate_site(p, image_size=40, seed=7)
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert a.masks.numpy().tobytes() == b.masks.numpy().tobytes()
    assert torch.equal(a.labels, b.labels) and a.case_ids == b.case_ids
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    c, _ = generate_site(p, image_size=40, seed=8)
    assert not torch.equal(a.images, c.images)


def test_cases_do_not_depend_on_image_size_or_other_sites(tmp_path) -> None:
    p = small("site2", 5, 7)
    _, f32 = generate_site(p, image_size=32, seed=1)
    _, f56 = generate_site(p, image_size=56, seed=1)
    for key in ("label", "composition", "echogenicity", "margin", "foci", "logit", "size_cm"):
        assert np.array_equal(f32[key], f56[key])
    # Seeds are per (seed, site name): adding a site leaves the others byte-identical.
    opts = UltrasoundOptions(image_size=32, scale=0.005, num_sites=1, external=False)
    one = synthesize_federation(opts, cache_dir=tmp_path / "a")
    two = synthesize_federation(opts.model_copy(update={"num_sites": 2}), cache_dir=tmp_path / "b")
    assert torch.equal(one.sites[0].train.images, two.sites[0].train.images)
    assert one.sites[0].val.case_ids == two.sites[0].val.case_ids


# ------------------------------------------------------------------------------ structure


def test_federation_structure(tiny_fed: Federation) -> None:
    assert tiny_fed.names == [p.name for p in DEFAULT_SITES]
    for site, profile in zip(tiny_fed.sites, DEFAULT_SITES, strict=True):
        n_b = max(4, round(profile.n_benign * 0.03))
        n_m = max(4, round(profile.n_malignant * 0.03))
        counts = np.add(site.train.class_counts(), site.val.class_counts())
        assert counts.tolist() == [n_b, n_m]  # exact per-site class counts
        assert site.val.class_counts()[0] >= 1 and site.val.class_counts()[1] >= 1
        json.dumps(site.meta)  # JSON-friendly metadata
        assert site.meta["probe"] == profile.probe and site.meta["role"] == "train"
    ext = tiny_fed.external
    assert ext is not None and len(ext.train) == 0 and ext.val.class_counts() == [4, 4]
    assert ext.meta["role"] == "external"
    data = tiny_fed.site("site3").train
    assert data.images.dtype == torch.uint8 and tuple(data.images.shape[1:]) == (1, 48, 48)
    assert data.labels.dtype == torch.int64
    assert data.masks is not None and data.masks.dtype == torch.uint8
    assert set(np.unique(data.masks.numpy())) <= {0, 1}
    assert all(c.startswith("site3-") and len(c) == len("site3-000123") for c in data.case_ids)
    assert len(set(tiny_fed.pooled_train().case_ids)) == len(tiny_fed.pooled_train())


# ------------------------------------------------------------------------------ site effects


def test_site_heterogeneity(tiny_fed: Federation) -> None:
    def images(name: str) -> np.ndarray:
        site = tiny_fed.external if name == "site7" else tiny_fed.site(name)
        assert site is not None
        parts = [d.images[:, 0].numpy().astype(float) for d in (site.train, site.val) if len(d)]
        return np.concatenate(parts)

    s = 48
    centre = (slice(int(0.3 * s), int(0.7 * s)),) * 2
    # Gain: site2 (+4 dB) is brighter than site4 (-5 dB), in the tissue and overall.
    assert (
        images("site2")[:, centre[0], centre[1]].mean()
        > images("site4")[:, centre[0], centre[1]].mean() + 20
    )
    assert images("site2").mean() > images("site4").mean()
    # Probe: sector sites are black outside the fan (bottom-left corner); linear ones are not.
    corner = (slice(int(0.88 * s), s), slice(int(0.09 * s), int(0.22 * s)))
    for name in ("site3", "site7"):
        assert images(name)[:, corner[0], corner[1]].mean() < 5
    for name in ("site1", "site2", "site6"):
        assert images(name)[:, corner[0], corner[1]].mean() > 15
    # Burned-in caption: the same bright glyph pixels in every image of overlay sites only.
    caption = (slice(1, 6), slice(1, 12))
    for name, profile in SITES.items():
        lit = images(name)[:, caption[0], caption[1]].min(axis=0).max()
        assert (lit > 180) == profile.text_overlay, name
    # Prevalence differs as configured.
    prev = {
        s.name: float(torch.cat([s.train.labels, s.val.labels]).float().mean()) for s in tiny_fed
    }
    assert prev["site5"] > prev["site4"] + 0.1


def test_jpeg_round_trip_is_real() -> None:
    """A JPEG site's images are fixed points of JPEG at that quality (nearly), a lossless one's not."""
    from medfed.data.synthetic.ultrasound import _jpeg

    for name, expect_small in (("site4", True), ("site2", False)):
        data, _ = generate_site(small(name, 3, 3), image_size=48, seed=0)
        im = data.images[0, 0].numpy()
        diff = np.abs(_jpeg(im, 65).astype(int) - im.astype(int)).mean()
        assert (diff < 1.5) == expect_small, (name, diff)


# ------------------------------------------------------------------------------ nodules & masks


def test_masks_non_empty_and_echogenicity_visible(sample_site1: tuple) -> None:
    data, f = sample_site1
    images = data.images[:, 0].numpy().astype(float)
    masks = data.masks.numpy().astype(bool)
    assert masks.sum(axis=(1, 2)).min() >= 20  # every nodule is visible and non-empty
    ring_struct = np.ones((3, 3), dtype=bool)
    diff = np.empty(len(images))
    for i, (im, m) in enumerate(zip(images, masks, strict=True)):
        ring = binary_dilation(m, ring_struct, 4) & ~binary_dilation(m, ring_struct, 1)
        diff[i] = im[m].mean() - im[ring].mean()
    by_echo = {e: diff[f["echogenicity"] == i].mean() for i, e in enumerate(ECHOGENICITY)}
    assert by_echo["anechoic"] < by_echo["very_hypoechoic"] < by_echo["hypoechoic"] < 0
    assert by_echo["hypoechoic"] < by_echo["isoechoic"] < by_echo["hyperechoic"]
    assert by_echo["hyperechoic"] > 0
    # Taller-than-wide is visible in the mask's bounding box.
    rows, cols = masks.any(axis=2).sum(axis=1), masks.any(axis=1).sum(axis=1)
    ttw = f["taller_than_wide"].astype(bool)
    assert (rows > cols)[ttw].mean() > 0.8 and (rows < cols)[~ttw].mean() > 0.8
    # Punctate microcalcifications survive at low resolution: bright pixels inside the nodule.
    brightest = np.array([im[m].max() for im, m in zip(images, masks, strict=True)])
    punctate, no_foci = f["foci"] == FOCI.index("punctate"), f["foci"] == FOCI.index("none")
    assert np.median(brightest[punctate]) > np.median(brightest[no_foci]) + 25


# ------------------------------------------------------------------------------ label model


def test_oracle_auc_is_calibrated_and_below_one() -> None:
    auc = federation_oracle_auc(UltrasoundOptions())  # the full default federation, no pixels
    assert 0.91 <= auc <= 0.94
    noisier = federation_oracle_auc(UltrasoundOptions(temperature=1.5))
    assert noisier < auc < 1.0


def test_malignant_nodules_look_more_suspicious() -> None:
    cases = sample_site_cases(SITES["site1"], seed=0)
    mal, ben = cases["label"] == 1, cases["label"] == 0
    ttw = cases["taller_than_wide"]
    irregular = cases["margin"] == MARGIN.index("irregular")
    punctate = cases["foci"] == FOCI.index("punctate")
    for feature in (ttw, irregular, punctate):
        assert feature[mal].mean() > feature[ben].mean() + 0.1
    assert (cases["composition"][ben] == 0).mean() > (cases["composition"][mal] == 0).mean()


def test_selection_keeps_class_conditional_features() -> None:
    """Exact class counts by selection change the prevalence, not what a malignant nodule is."""
    rare = dataclasses.replace(SITES["site1"], n_benign=6000, n_malignant=2000)
    common = dataclasses.replace(SITES["site1"], n_benign=2000, n_malignant=6000)
    a, b = sample_site_cases(rare, seed=0), sample_site_cases(common, seed=0)
    assert (a["label"] == 1).sum() == 2000 and (b["label"] == 1).sum() == 6000
    for label in (0, 1):
        ta = a["taller_than_wide"][a["label"] == label].mean()
        tb = b["taller_than_wide"][b["label"] == label].mean()
        assert abs(ta - tb) < 0.035


# ------------------------------------------------------------------------------ cache & preview


def test_second_call_loads_from_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = UltrasoundOptions(image_size=32, scale=0.01, num_sites=2)
    first = synthesize_federation(opts, cache_dir=tmp_path)
    files = sorted((tmp_path / "ultrasound").glob("*.npz"))
    assert len(files) == 3  # two training sites + external

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("generator re-run despite a warm cache")

    monkeypatch.setattr(us, "generate_site", boom)
    second = synthesize_federation(opts, cache_dir=tmp_path)
    for s1, s2 in zip(
        (*first.sites, first.external), (*second.sites, second.external), strict=True
    ):
        for d1, d2 in ((s1.train, s2.train), (s1.val, s2.val)):
            assert torch.equal(d1.images, d2.images) and torch.equal(d1.masks, d2.masks)
            assert torch.equal(d1.labels, d2.labels) and d1.case_ids == d2.case_ids
    with pytest.raises(AssertionError, match="warm cache"):  # any parameter change is a miss
        synthesize_federation(opts.model_copy(update={"seed": 1}), cache_dir=tmp_path)


def test_preview_writes_png(tiny_fed: Federation, tmp_path) -> None:
    path = write_preview(tiny_fed, tmp_path / "preview.png", per_site=4)
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_large_images_work() -> None:
    data, _ = generate_site(small("site7", 2, 2), image_size=224, seed=0)
    assert tuple(data.images.shape) == (4, 1, 224, 224) and data.masks.shape == (4, 224, 224)
    assert data.masks.numpy().sum(axis=(1, 2)).min() > 200
