"""Synthetic multi-site thyroid-nodule ultrasound: B-mode images, nodule masks, site effects.

Why synthetic, and why this realistic: every demo, test and benchmark of medfed runs on this data,
so it has to carry the properties that make federated learning on real hospital data hard and
interesting - a label that depends on visible nodule features but is noisy (a perfect reader is
not perfect), and sites that differ in case mix, scanner and export chain (so site heterogeneity,
domain shift to an external hospital and shortcut features such as burned-in text all exist).

How an image is made (vectorised over a chunk of cases, no per-pixel Python):

1. ``ultrasound_sites.sample_site_cases`` draws TI-RADS-like features and the label from them
   (exact class counts by selection - see that module); ``sample_geometry`` turns features into
   anatomy: thyroid lobe, strap muscles, carotid, trachea, and a nodule whose boundary is
   r(theta) = r0 (1 + sum_k a_k cos(k theta + phi_k)) (smooth, lobulated or irregular).
2. The anatomy gives an echogenicity (backscatter power) map and an excess-attenuation map on the
   *acquisition* grid: depth x lateral for a linear probe, radius x angle for a sector probe.
3. Speckle: complex Gaussian scatterers weighted by sqrt(echogenicity), convolved with the probe's
   point-spread function, envelope-detected - fully developed speckle is Rayleigh distributed and
   multiplicative, and its grain is the PSF width (``speckle_grain``).
4. Depth: attenuation is integrated along each beam (cysts and the carotid enhance what lies below
   them, calcifications and tracheal air shadow it) plus a residual time-gain falloff.
5. Echogenic foci are bright specular reflectors, a few pixels wide even at 64 px.
6. Log compression with the site's gain, dynamic range and gamma; scan conversion to the fan for a
   sector probe (black outside); the site's blur / resolution loss; burned-in text; a real JPEG
   round trip through Pillow at the site's quality.

Everything is deterministic in (seed, site name): numpy Generators seeded per site and purpose,
so adding a site never changes another. Results are cached as .npz keyed by every parameter and
``GENERATOR_VERSION``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from medfed.data.site import ArrayDataset, Federation, Site
from medfed.data.synthetic.cache import default_cache_dir, load_site, render_chunks, save_site
from medfed.data.synthetic.render import blend, sigmoid_
from medfed.data.synthetic.ultrasound_sites import (
    COMPOSITION,
    DEFAULT_EXTERNAL,
    DEFAULT_SITES,
    DEFAULT_TEMPERATURE,
    ECHOGENICITY,
    FOCI,
    MARGIN,
    N_BLOBS,
    N_HARMONICS,
    SECTOR_APEX,
    SiteProfile,
    draw_overlay,
    probe_grids,
    sample_geometry,
    sample_site_cases,
    site_seed,
)

__all__ = [
    "COMPOSITION",
    "DEFAULT_EXTERNAL",
    "DEFAULT_SITES",
    "DEFAULT_TEMPERATURE",
    "ECHOGENICITY",
    "FOCI",
    "GENERATOR_VERSION",
    "MARGIN",
    "SiteProfile",
    "UltrasoundOptions",
    "federation_oracle_auc",
    "generate_site",
    "synthesize_federation",
]

#: Bump whenever the pixels or labels a given set of parameters produces change (invalidates caches).
GENERATOR_VERSION = "2"

_PIXELS_PER_CHUNK = 1 << 19  # 128 cases at 64 px, 10 at 224 px: cache-friendly, bounded memory
_EDGE = 0.025  # cm: width of soft tissue boundaries before the PSF blurs them further
_F32 = np.float32


class UltrasoundOptions(BaseModel):
    """Options of the default synthetic federation (what a config's ``data:`` block holds).

    ``scale`` shrinks every site (per class, rounded, at least 4) for tiny test federations;
    ``num_sites`` keeps the first k default sites; ``temperature`` is the label-noise knob:
    logit = (TI-RADS points - 4.5) / temperature, so higher means noisier labels (lower oracle AUC).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(64, ge=16, le=1024)
    seed: int = Field(0, ge=0)
    scale: float = Field(1.0, gt=0.0)
    num_sites: int = Field(len(DEFAULT_SITES), ge=1, le=len(DEFAULT_SITES))
    external: bool = True
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0.0)

    def profiles(self) -> tuple[tuple[SiteProfile, ...], SiteProfile | None]:
        """The (scaled) training profiles and the external one (None if disabled)."""

        def scaled(p: SiteProfile) -> SiteProfile:
            if self.scale == 1.0:
                return p
            n_b = max(4, round(p.n_benign * self.scale))
            n_m = max(4, round(p.n_malignant * self.scale))
            return dataclasses.replace(p, n_benign=n_b, n_malignant=n_m)

        sites = tuple(scaled(p) for p in DEFAULT_SITES[: self.num_sites])
        return sites, scaled(DEFAULT_EXTERNAL) if self.external else None


# --------------------------------------------------------------------------------------------
# Anatomy


def _gauss(x: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-np.square(x * (1.0 / width)))


def _col(g: dict[str, np.ndarray], key: str, j: int) -> np.ndarray:
    return g[key][:, j, None, None]


def _nodule(X: np.ndarray, Z: np.ndarray, g: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Signed distance (cm, negative inside) to the r(theta) boundary, and nodule-frame coords."""
    du, dv = X - g["nx"], Z - g["nz"]
    u = (du * g["cos_t"] + dv * g["sin_t"]) / g["na"]
    v = (dv * g["cos_t"] - du * g["sin_t"]) / g["nb"]
    rho = np.hypot(u, v)
    inv = 1.0 / np.maximum(rho, 1e-6)
    c1, s1 = u * inv, v * inv  # cos, sin of theta; powers by the angle-addition recurrence
    ck, sk = c1 * c1 - s1 * s1, 2 * c1 * s1  # k = 2
    radius = np.ones_like(rho)
    for k in range(N_HARMONICS):
        radius += _col(g, "coef_re", k) * ck - _col(g, "coef_im", k) * sk  # Re(a_k e^{ik theta})
        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
    return (rho - radius) * g["nr"], u, v


def _foci(
    grid: dict[str, np.ndarray], g: dict[str, np.ndarray], shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Specular foci and their shadows, evaluated only in a small window around each focus.

    Foci are tiny, so stamping them (gather the window's coordinates, evaluate, scatter-max)
    costs a fraction of evaluating every focus over the whole image.
    """
    n, h, w = shape
    spec, alpha = np.zeros(shape, _F32), np.zeros(shape, _F32)
    b, j = np.nonzero(g["f_amp"] > 0)  # (case, focus) pairs that exist
    if len(b) == 0:
        return spec, alpha
    fx, fz = g["fx"][b, j], g["fz"][b, j]
    a0, da, c0, dc = grid["index"]
    if "sample" in grid:  # sector: (row, col) = (radius, angle)
        ra, ca = np.hypot(fx, fz + SECTOR_APEX), np.arctan2(fx, fz + SECTOR_APEX)
        px = min(da, dc * 1.3)  # foci sit at least 0.3 cm deep: radius >= 1.3 cm
    else:
        ra, ca, px = fz, fx, min(da, dc)
    row, col = np.rint((ra - a0) / da - 0.5).astype(int), np.rint((ca - c0) / dc - 0.5).astype(int)
    half = int(np.ceil(0.3 / px)) + 1
    down = int(np.ceil(0.45 / da)) + 1  # room for a comet tail below the focus
    cols = np.arange(-half, half + 1)
    rows = np.arange(-int(np.ceil(0.3 / da)) - 1, down + 1)
    rr = row[:, None, None] + rows[None, :, None]
    cc = col[:, None, None] + cols[None, None, :]
    valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    rr, cc = np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)
    X, Z = grid["X"][0][rr, cc], grid["Z"][0][rr, cc]
    fr = np.maximum(g["f_r"][b, j], 1e-3)[:, None, None]
    dx, dz = X - fx[:, None, None], Z - fz[:, None, None]
    blob = np.exp(-np.square((dx * dx + dz * dz) / (2 * fr * fr)))  # flat-topped, crisp
    tail = np.exp(-(dx * dx) / (2 * 0.04**2) - np.abs(dz) / 0.12) * (dz > 0)
    blob = np.maximum(blob, 0.6 * g["f_tail"][b, j][:, None, None] * tail) * valid
    flat = (b[:, None, None] * h + rr) * w + cc
    np.maximum.at(spec.reshape(-1), flat.ravel(), (g["f_amp"][b, j][:, None, None] * blob).ravel())
    np.add.at(
        alpha.reshape(-1),
        flat.ravel(),
        (g["f_shadow"][b, j][:, None, None] / (1.6 * fr) * blob).ravel(),
    )
    return spec, alpha


def _anatomy(
    grid: dict[str, np.ndarray], g: dict[str, np.ndarray], noise: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Echogenicity (power, thyroid = 1), excess attenuation (1/cm), specular reflectors, and
    the nodule's signed distance on the acquisition grid."""
    X, Z, D = grid["X"], grid["Z"], grid["D"]
    n0, n1 = noise[:, 0], noise[:, 1]
    fb, sb = g["fat_bottom"], g["strap_bottom"]
    fibres = np.cos((2 * np.pi / 0.16) * (D + 0.04 * np.sin(2.5 * X + n1)))
    E = 0.35 * np.exp(0.35 * n0) * (1 + 0.3 * fibres)  # deep soft tissue
    strap = 0.3 * (1 + 0.6 * fibres)
    E = blend(E, strap, sigmoid_((sb - D) * (1 / _EDGE)))
    E = blend(E, 0.6 * np.exp(0.35 * n1), sigmoid_((fb - D) * (1 / _EDGE)))  # subcutaneous fat
    E = blend(E, 3.0, sigmoid_((0.1 - D) * (1 / _EDGE)))  # skin
    d = np.hypot(X - g["cx"], (Z - fb - 0.35) * (1 / 0.28))  # sternocleidomastoid
    E = blend(E, strap * 0.9, sigmoid_((1 - d) * (0.28 / _EDGE)))
    d = np.hypot(
        (X - g["tx"] + 0.3 * g["side"]) * (1 / 0.75), (Z - g["tz"] - g["tb"] - 0.3) * (1 / 0.3)
    )
    E = blend(E, 0.3, sigmoid_((1 - d) * (0.3 / _EDGE)))  # longus colli

    mn = np.minimum(g["ta"], g["tb"])
    rl = np.hypot((X - g["tx"]) / g["ta"], (Z - g["tz"]) / g["tb"])
    E = blend(E, np.exp(g["het"] * n1), sigmoid_((1 - rl) * mn / _EDGE))  # thyroid lobe
    E *= 1 + 1.2 * _gauss((rl - 1) * mn, 0.035)  # capsule

    sd, u, v = _nodule(X, Z, g)
    cyst = np.zeros_like(E)
    for j in range(N_BLOBS):
        db = np.hypot(u - _col(g, "blob_u", j), v - _col(g, "blob_v", j))
        blob = _col(g, "blob_on", j) * sigmoid_((_col(g, "blob_r", j) - db) * g["nr"] / _EDGE)
        np.maximum(cyst, blob, out=cyst)
    inner = blend(g["level"] * np.exp(-g["texture"] * n0), 0.004, cyst)
    E *= 1 - 0.75 * g["halo"] * _gauss(sd - 0.04, 0.03)
    E *= 1 + 2.0 * g["wall"] * _gauss(sd, 0.03)
    inside = sigmoid_(sd * (-1 / (0.8 * _EDGE)))
    E = blend(E, inner, inside)
    spec, alpha = _foci(grid, g, E.shape)
    alpha += inside * (g["alpha_in"] - 0.6 * cyst)

    d = np.hypot(X - g["cx"], Z - g["cz"])  # carotid: anechoic lumen, bright wall, enhancement
    lumen = sigmoid_((g["rc"] - d) * (1 / _EDGE))
    E = blend(E, 0.005, lumen) * (1 + 1.5 * _gauss(d - g["rc"], 0.04))
    alpha -= 0.6 * lumen
    depth_in = g["rq"] - np.hypot(X - g["qx"], Z - g["qz"])  # trachea
    air = sigmoid_(depth_in * (1 / _EDGE))
    reverb = sum(0.55**m * _gauss(depth_in - 0.3 * m, 0.06) for m in (1, 2, 3))
    E = blend(E, 0.03 + 2.0 * reverb, air)  # reverberations: fading copies of the wall
    E += 6.0 * _gauss(depth_in, 0.05) * (g["qz"] - Z > 0)  # bright anterior wall
    alpha += 4.0 * air  # air: the shadow deepens down the lumen and stays dark behind it
    return E, alpha, spec, sd


def _smooth_noise(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Two channels of unit-variance low-frequency noise: tissue heterogeneity, nodule texture."""
    coarse = torch.from_numpy(rng.standard_normal((n, 2, 7, 7)).astype(_F32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).numpy()


# --------------------------------------------------------------------------------------------
# Imaging chain


@lru_cache(maxsize=32)
def _psf_norm(sig_r: float, sig_c: float) -> float:
    """RMS gain of the PSF filter on white noise, so tissue of power 1 has mean envelope^2 = 1."""
    delta = np.zeros((65, 65))
    delta[32, 32] = 1.0
    return float(np.sqrt((gaussian_filter(delta, (sig_r, sig_c), mode="constant") ** 2).sum()))


def _render_chunk(
    p: SiteProfile, g: dict[str, np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, B x H x W, before overlay and JPEG) and masks of one chunk of cases."""
    grid = probe_grids(p.probe, size)
    gb = {k: (v[:, None, None] if v.ndim == 1 else v).astype(_F32) for k, v in g.items()}
    n = len(g["nx"])
    E, alpha, spec, sd = _anatomy(grid, gb, _smooth_noise(rng, n, size))

    k = size / 64.0
    sig_r, sig_c = 0.45 * p.speckle_grain * k, 0.8 * p.speckle_grain * k
    # Two-look compounding (two complex speckle realisations averaged in intensity), as modern
    # scanners do: it softens the black speckle nulls that single-look log images show.
    field = np.sqrt(E) * rng.standard_normal((4, n, size, size), dtype=_F32)
    field = gaussian_filter(field, (0, 0, sig_r, sig_c), mode="reflect", truncate=3.0)
    env = np.sqrt(np.square(field).sum(axis=0)) * float(0.5 / _psf_norm(sig_r, sig_c))
    env *= np.exp(-np.cumsum(alpha * _F32(grid["step"]), axis=1))  # integrated along the beam
    env = np.maximum(env, spec)
    env *= 10.0 ** (-p.attenuation_db / 20.0 * grid["depth"])  # residual time-gain falloff
    env = np.hypot(env, 0.01 * rng.rayleigh(size=env.shape).astype(_F32))  # noise floor

    db = 20.0 * np.log10(env + 1e-6) + (p.gain - 20.0)
    img = np.clip((db + p.dynamic_range_db) * (1.0 / p.dynamic_range_db), 0.0, 1.0) ** p.gamma
    if p.probe == "sector":  # scan conversion: polar acquisition -> Cartesian display
        grid_t = torch.from_numpy(
            np.ascontiguousarray(np.broadcast_to(grid["sample"], (n, size, size, 2)))
        )
        img = F.grid_sample(torch.from_numpy(img[:, None]), grid_t, mode="bilinear",
                            padding_mode="border", align_corners=False)[:, 0].numpy()  # fmt: skip
        sd = _nodule(grid["Xd"], grid["Zd"], gb)[0]  # the mask lives on the display grid
    img = img * grid["foot"]
    if p.blur > 0:
        img = gaussian_filter(img, (0, p.blur * k, p.blur * k), mode="nearest")
    if p.resolution < 1.0:
        low = max(8, round(size * p.resolution))
        t = F.interpolate(torch.from_numpy(img[:, None]), size=(low, low), mode="area")
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        img = t[:, 0].numpy()
    images = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    masks = ((sd < 0) & grid["foot"]).astype(np.uint8)
    return images, masks


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"))


def generate_site(
    profile: SiteProfile,
    *,
    image_size: int,
    seed: int,
    temperature: float = DEFAULT_TEMPERATURE,
) -> tuple[ArrayDataset, dict[str, np.ndarray]]:
    """Generate one site: its dataset (images, labels, masks, case ids) and per-case features.

    The feature table has one row per case, in dataset order: ``case_id``, ``label``,
    ``composition`` (index into COMPOSITION), ``echogenicity`` (ECHOGENICITY), ``taller_than_wide``,
    ``margin`` (MARGIN), ``foci`` (FOCI), ``points`` (TI-RADS-like), ``logit`` (the true one: the
    oracle predictor), ``size_cm`` (equivalent diameter) and ``aspect`` (depth / width).
    """
    cases = sample_site_cases(profile, seed=seed, temperature=temperature)
    geo = sample_geometry(profile, cases, seed=seed)
    n = len(cases["label"])
    chunk = max(1, _PIXELS_PER_CHUNK // (image_size * image_size))
    starts = list(range(0, n, chunk))

    def render(c: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(starts[c], min(n, starts[c] + chunk))
        rng = np.random.default_rng(site_seed(seed, profile.name, 2, c))
        part = {k: v[sl] for k, v in geo.items()}
        imgs, masks = _render_chunk(profile, part, image_size, rng)
        if profile.text_overlay:
            draw_overlay(imgs, profile, part)
        if profile.jpeg_quality is not None:
            imgs = np.stack([_jpeg(im, profile.jpeg_quality) for im in imgs])
        return imgs, masks

    parts = render_chunks(render, len(starts))
    images = np.concatenate([im for im, _ in parts])[:, None]
    masks = np.concatenate([m for _, m in parts])
    case_ids = tuple(f"{profile.name}-{i:06d}" for i in range(n))
    data = ArrayDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(cases["label"].astype(np.int64)),
        masks=torch.from_numpy(masks),
        case_ids=case_ids,
    )
    features = {k: cases[k] for k in ("label", "composition", "echogenicity", "taller_than_wide")}
    features |= {k: cases[k] for k in ("margin", "foci", "points", "logit")}
    features["size_cm"] = 2.0 * geo["nr"]
    features["aspect"] = geo["nb"] / geo["na"]
    features["case_id"] = np.array(case_ids)
    return data, features


# --------------------------------------------------------------------------------------------
# Federation and cache


def _cache_key(profile: SiteProfile, image_size: int, seed: int, temperature: float) -> str:
    blob = json.dumps(
        {"version": GENERATOR_VERSION, "profile": dataclasses.asdict(profile),
         "image_size": image_size, "seed": seed, "temperature": temperature},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_or_generate_site(
    profile: SiteProfile,
    *,
    image_size: int,
    seed: int,
    temperature: float = DEFAULT_TEMPERATURE,
    cache_dir: str | Path | None = None,
) -> tuple[ArrayDataset, dict[str, np.ndarray]]:
    """``generate_site`` behind the on-disk cache (one .npz per site and parameter set)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(profile, image_size, seed, temperature)
    path = root / "ultrasound" / f"{profile.name}-{image_size}px-{key}.npz"
    if path.exists():
        return load_site(path)
    data, features = generate_site(
        profile, image_size=image_size, seed=seed, temperature=temperature
    )
    save_site(path, data, features)
    return data, features


def _meta(profile: SiteProfile, role: str) -> dict[str, object]:
    return {**dataclasses.asdict(profile), "role": role, "generator_version": GENERATOR_VERSION}


def synthesize_federation(
    opts: UltrasoundOptions, *, cache_dir: str | Path | None = None
) -> Federation:
    """The default 6-site federation (+ external site), from the cache when it is there.

    Each training site is split stratified into train / val (``opts.val_fraction``, seed derived
    from (seed, site)). The external site exists only to be evaluated on: its ``val`` holds all its
    images and its ``train`` is an empty dataset of the same shape, so code that iterates
    ``federation.sites`` never trains on it by accident. ``cache_dir=None`` uses
    ``default_cache_dir()``. Per-site meta holds the profile fields (JSON-friendly scalars).
    """
    profiles, external = opts.profiles()

    def build(p: SiteProfile) -> ArrayDataset:
        return load_or_generate_site(
            p,
            image_size=opts.image_size,
            seed=opts.seed,
            temperature=opts.temperature,
            cache_dir=cache_dir,
        )[0]

    sites = []
    for p in profiles:
        split_seed = int(site_seed(opts.seed, p.name, 3).generate_state(1)[0])
        sites.append(Site.from_dataset(p.name, build(p), val_fraction=opts.val_fraction,
                                       seed=split_seed, meta=_meta(p, "train")))  # fmt: skip
    ext = None
    if external is not None:
        data = build(external)
        ext = Site(external.name, data.subset([]), data, meta=_meta(external, "external"))
    return Federation(tuple(sites), ext)


def federation_oracle_auc(
    opts: UltrasoundOptions | None = None, *, external: bool = False
) -> float:
    """AUC of the true logit over the pooled training sites (or the external site).

    Uses only the case model, no pixels, so it is instant even for the full federation: the
    ceiling any image classifier can reach on this data, for calibration checks.
    """
    opts = opts or UltrasoundOptions()
    profiles, ext = opts.profiles()
    chosen = (ext,) if external and ext is not None else profiles
    cases = [sample_site_cases(p, seed=opts.seed, temperature=opts.temperature) for p in chosen]
    labels = np.concatenate([c["label"] for c in cases])
    return float(roc_auc_score(labels, np.concatenate([c["logit"] for c in cases])))
