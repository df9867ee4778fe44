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
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import roc_auc_score

from medfed.data.site import ArrayDataset, Federation, Site
from medfed.data.synthetic.ultrasound_sites import (
    COMPOSITION,
    DEFAULT_EXTERNAL,
    DEFAULT_SITES,
    DEFAULT_TEMPERATURE,
    ECHOGENICITY,
    FOCI,
    LINEAR_HALF_WIDTH,
    LINEAR_WINDOW,
    MARGIN,
    N_BLOBS,
    N_FOCI,
    N_HARMONICS,
    SECTOR_APEX,
    SECTOR_HALF_ANGLE,
    SECTOR_R1,
    SECTOR_WINDOW,
    SiteProfile,
    draw_overlay,
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
GENERATOR_VERSION = "1"

_PIXELS_PER_CHUNK = 1 << 21  # 512 cases at 64 px, 41 at 224 px: bounded memory, numpy-sized ops
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
# Grids


@lru_cache(maxsize=16)
def _grids(probe: str, size: int) -> dict[str, torch.Tensor]:
    """Acquisition grid (rows = depth along the beam) and display grid, in cm, as (1, H, W).

    Linear: acquisition grid = display grid. Sector: acquisition is (radius, angle) and the
    display pixels look it up by scan conversion; outside the fan is black.
    """
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    if probe == "linear":
        x0, x1, z0, z1 = LINEAR_WINDOW
        X, Z = np.meshgrid(x0 + (x1 - x0) * c, z0 + (z1 - z0) * c)
        foot = (np.abs(X) <= LINEAR_HALF_WIDTH) & (Z >= 0.0)
        g = {"X": X, "Z": Z, "D": np.maximum(Z, 0.0), "Xd": X, "Zd": Z, "foot": foot}
        g["step"] = np.full((1, 1), (z1 - z0) / size)
        g["depth"] = np.clip(Z / z1, 0.0, 1.0)
    else:
        r = SECTOR_APEX + (SECTOR_R1 - SECTOR_APEX) * c
        th = SECTOR_HALF_ANGLE * (2.0 * c - 1.0)
        R, TH = np.meshgrid(r, th, indexing="ij")
        x0, x1, z0, z1 = SECTOR_WINDOW
        Xd, Zd = np.meshgrid(x0 + (x1 - x0) * c, z0 + (z1 - z0) * c)
        rd, thd = np.hypot(Xd, Zd + SECTOR_APEX), np.arctan2(Xd, Zd + SECTOR_APEX)
        foot = (rd >= SECTOR_APEX) & (rd <= SECTOR_R1) & (np.abs(thd) <= SECTOR_HALF_ANGLE)
        g = {"X": R * np.sin(TH), "Z": R * np.cos(TH) - SECTOR_APEX, "D": R - SECTOR_APEX}
        g.update(Xd=Xd, Zd=Zd, foot=foot, step=np.full((1, 1), (SECTOR_R1 - SECTOR_APEX) / size))
        g["depth"] = (R - SECTOR_APEX) / (SECTOR_R1 - SECTOR_APEX)
        span = SECTOR_R1 - SECTOR_APEX
        g["sample"] = np.stack([thd / SECTOR_HALF_ANGLE, 2 * (rd - SECTOR_APEX) / span - 1], -1)
    return {k: torch.from_numpy(v.astype(_F32) if v.dtype == np.float64 else v)[None]
            for k, v in g.items()}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Anatomy (torch on CPU: the same maths as numpy, but multi-threaded and vectorised)

_sig = torch.sigmoid


def _blend(a: torch.Tensor, b: torch.Tensor | float, t: torch.Tensor) -> torch.Tensor:
    return a + (b - a) * t


def _gauss(x: torch.Tensor, width: float) -> torch.Tensor:
    return torch.exp(-((x / width) ** 2))


def _col(g: dict[str, torch.Tensor], key: str, j: int) -> torch.Tensor:
    return g[key][:, j, None, None]


def _nodule(X: torch.Tensor, Z: torch.Tensor, g: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Signed distance (cm, negative inside) to the r(theta) boundary, and nodule-frame coords."""
    du, dv = X - g["nx"], Z - g["nz"]
    u = (du * g["cos_t"] + dv * g["sin_t"]) / g["na"]
    v = (dv * g["cos_t"] - du * g["sin_t"]) / g["nb"]
    rho = torch.hypot(u, v)
    inv = 1.0 / rho.clamp_min(1e-6)
    c1, s1 = u * inv, v * inv  # cos, sin of theta; powers by the angle-addition recurrence
    ck, sk = c1 * c1 - s1 * s1, 2 * c1 * s1  # k = 2
    radius = torch.ones_like(rho)
    for k in range(N_HARMONICS):
        radius += _col(g, "coef_re", k) * ck - _col(g, "coef_im", k) * sk  # Re(a_k e^{ik theta})
        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
    return (rho - radius) * g["nr"], u, v


def _anatomy(grid: dict[str, torch.Tensor], g: dict[str, torch.Tensor], noise: torch.Tensor):
    """Echogenicity (power, thyroid = 1), excess attenuation (1/cm) and specular reflectors."""
    X, Z, D = grid["X"], grid["Z"], grid["D"]
    n0, n1 = noise[:, 0], noise[:, 1]
    fb, sb = g["fat_bottom"], g["strap_bottom"]
    fibres = torch.cos(2 * np.pi * (D + 0.04 * torch.sin(2.5 * X + n1)) / 0.16)
    E = 0.35 * torch.exp(0.35 * n0) * (1 + 0.3 * fibres)  # deep soft tissue
    strap = 0.3 * (1 + 0.6 * fibres)
    E = _blend(E, strap, _sig((sb - D) / _EDGE))
    E = _blend(E, 0.6 * torch.exp(0.35 * n1), _sig((fb - D) / _EDGE))  # subcutaneous fat
    E = _blend(E, 3.0, _sig((0.1 - D) / _EDGE))  # skin
    d = torch.hypot(X - g["cx"], (Z - fb - 0.35) / 0.28)  # sternocleidomastoid
    E = _blend(E, strap * 0.9, _sig((1 - d) * (0.28 / _EDGE)))
    d = torch.hypot((X - g["tx"] + 0.3 * g["side"]) / 0.75, (Z - g["tz"] - g["tb"] - 0.3) / 0.3)
    E = _blend(E, 0.3, _sig((1 - d) * (0.3 / _EDGE)))  # longus colli

    mn = torch.minimum(g["ta"], g["tb"])
    rl = torch.hypot((X - g["tx"]) / g["ta"], (Z - g["tz"]) / g["tb"])
    E = _blend(E, torch.exp(g["het"] * n1), _sig((1 - rl) * mn / _EDGE))  # thyroid lobe
    E *= 1 + 1.2 * _gauss((rl - 1) * mn, 0.035)  # capsule

    sd, u, v = _nodule(X, Z, g)
    cyst = torch.zeros_like(E)
    for j in range(N_BLOBS):
        db = torch.hypot(u - _col(g, "blob_u", j), v - _col(g, "blob_v", j))
        blob = _col(g, "blob_on", j) * _sig((_col(g, "blob_r", j) - db) * g["nr"] / _EDGE)
        cyst = torch.maximum(cyst, blob)
    inner = _blend(g["level"] * torch.exp(-g["texture"] * n0), 0.004, cyst)
    E *= 1 - 0.75 * g["halo"] * _gauss(sd - 0.04, 0.03)
    E *= 1 + 2.0 * g["wall"] * _gauss(sd, 0.03)
    inside = _sig(-sd / (0.8 * _EDGE))
    E = _blend(E, inner, inside)
    alpha = inside * (g["alpha_in"] - 0.6 * cyst)

    d = torch.hypot(X - g["cx"], Z - g["cz"])  # carotid: anechoic lumen, bright wall, enhancement
    lumen = _sig((g["rc"] - d) / _EDGE)
    E = _blend(E, 0.005, lumen) * (1 + 1.5 * _gauss(d - g["rc"], 0.04))
    alpha -= 0.6 * lumen
    d = torch.hypot(X - g["qx"], Z - g["qz"])  # trachea: bright anterior wall, air shadow below
    air = _sig((g["rq"] - d) / _EDGE)
    depth_in = g["rq"] - d
    reverb = sum(0.55**m * _gauss(depth_in - 0.3 * m, 0.06) for m in (1, 2, 3))
    E = _blend(E, 0.03 + 2.0 * reverb, air)  # reverberations: fading copies of the wall
    E += 6.0 * _gauss(depth_in, 0.05) * (Z < g["qz"])
    alpha += 4.0 * air  # air: the shadow deepens down the lumen and stays dark behind it

    spec = torch.zeros_like(E)
    for j in range(N_FOCI):
        if not bool((g["f_amp"][:, j] > 0).any()):
            continue
        fr = _col(g, "f_r", j).clamp_min(1e-3)
        dx, dz = X - _col(g, "fx", j), Z - _col(g, "fz", j)
        blob = torch.exp(-(((dx * dx + dz * dz) / (2 * fr * fr)) ** 2))  # flat-topped, crisp
        if bool((g["f_tail"][:, j] > 0).any()):  # comet tail: a short fading streak below
            tail = torch.exp(-(dx * dx) / (2 * 0.04**2) - dz.abs() / 0.12) * (dz > 0)
            blob = torch.maximum(blob, 0.6 * _col(g, "f_tail", j) * tail)
        spec = torch.maximum(spec, _col(g, "f_amp", j) * blob)
        alpha += _col(g, "f_shadow", j) / (1.6 * fr) * blob
    return E, alpha, spec


def _smooth_noise(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    """Two channels of unit-variance low-frequency noise: tissue heterogeneity, nodule texture."""
    coarse = torch.from_numpy(rng.standard_normal((n, 2, 7, 7)).astype(_F32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


# --------------------------------------------------------------------------------------------
# Imaging chain


@lru_cache(maxsize=64)
def _kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return torch.from_numpy((k / k.sum()).astype(_F32))


def _gaussian_blur(x: torch.Tensor, sig_r: float, sig_c: float, mode: str) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) over H (sig_r) and W (sig_c), edge ``mode``."""
    y = x[:, None]
    for sigma, vertical in ((sig_r, True), (sig_c, False)):
        k = _kernel(sigma)
        r = (len(k) - 1) // 2
        pad = (0, 0, r, r) if vertical else (r, r, 0, 0)
        weight = k.view(1, 1, -1, 1) if vertical else k.view(1, 1, 1, -1)
        y = F.conv2d(F.pad(y, pad, mode=mode), weight)
    return y[:, 0]


def _render_chunk(
    p: SiteProfile, g: dict[str, np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, B x H x W, before JPEG) and masks of one chunk of cases."""
    grid = _grids(p.probe, size)
    gb = {k: torch.from_numpy((v[:, None, None] if v.ndim == 1 else v).astype(_F32))
          for k, v in g.items()}  # fmt: skip
    n = len(g["nx"])
    E, alpha, spec = _anatomy(grid, gb, _smooth_noise(rng, n, size))

    k = size / 64.0
    sig_r, sig_c = 0.45 * p.speckle_grain * k, 0.8 * p.speckle_grain * k
    # Two-look compounding (two complex speckle realisations averaged in intensity), as modern
    # scanners do: it softens the black speckle nulls that single-look log images show.
    white = torch.from_numpy(rng.standard_normal((4 * n, size, size), dtype=_F32))
    field = _gaussian_blur(white * E.sqrt().repeat(4, 1, 1), sig_r, sig_c, "reflect")
    norm = float(2.0 * (_kernel(sig_r) ** 2).sum().sqrt() * (_kernel(sig_c) ** 2).sum().sqrt())
    env = (field**2).view(4, n, size, size).sum(0).sqrt_() / norm
    env *= torch.exp(-torch.cumsum(alpha * grid["step"], dim=1))  # integrated along the beam
    falloff = torch.pow(10.0, -p.attenuation_db * grid["depth"] / 20.0)
    env = torch.maximum(env, spec) * falloff
    floor = torch.from_numpy(rng.rayleigh(size=(n, size, size)).astype(_F32))
    env = torch.hypot(env, 0.01 * floor)  # electronic noise floor

    db = 20.0 * torch.log10(env + 1e-6) + (p.gain - 20.0)
    img = ((db + p.dynamic_range_db) / p.dynamic_range_db).clamp_(0.0, 1.0) ** p.gamma
    if p.probe == "sector":  # scan conversion: polar acquisition -> Cartesian display
        img = F.grid_sample(img[:, None], grid["sample"].expand(n, -1, -1, -1), mode="bilinear",
                            padding_mode="border", align_corners=False)[:, 0]  # fmt: skip
    img = img * grid["foot"]
    if p.blur > 0:
        img = _gaussian_blur(img, p.blur * k, p.blur * k, "replicate")
    if p.resolution < 1.0:
        low = max(8, round(size * p.resolution))
        t = F.interpolate(img[:, None], size=(low, low), mode="area")
        img = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    images = (img * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    sd, _, _ = _nodule(grid["Xd"], grid["Zd"], gb)
    masks = ((sd < 0) & grid["foot"]).to(torch.uint8).numpy()
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
    images = np.empty((n, 1, image_size, image_size), np.uint8)
    masks = np.empty((n, image_size, image_size), np.uint8)
    for c, start in enumerate(range(0, n, chunk)):
        sl = slice(start, min(n, start + chunk))
        rng = np.random.default_rng(site_seed(seed, profile.name, 2, c))
        part = {k: v[sl] for k, v in geo.items()}
        imgs, masks[sl] = _render_chunk(profile, part, image_size, rng)
        if profile.text_overlay:
            draw_overlay(imgs, profile, part)
        if profile.jpeg_quality is not None:
            imgs = np.stack([_jpeg(im, profile.jpeg_quality) for im in imgs])
        images[sl, 0] = imgs
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


def default_cache_dir() -> Path:
    """``$MEDFED_CACHE_DIR`` or ``~/.cache/medfed``; generated data is cheap to rebuild."""
    return Path(os.environ.get("MEDFED_CACHE_DIR", Path.home() / ".cache" / "medfed"))


def _save(path: Path, data: ArrayDataset, features: dict[str, np.ndarray]) -> None:
    assert data.masks is not None
    arrays = {"images": data.images.numpy(), "labels": data.labels.numpy(),
              "masks": np.packbits(data.masks.numpy(), axis=-1),
              "mask_width": np.array(data.masks.shape[-1])}  # fmt: skip
    arrays |= {f"feature_{k}": v for k, v in features.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)  # atomic: concurrent readers never see a half-written file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> tuple[ArrayDataset, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        width = int(z["mask_width"])
        masks = np.unpackbits(z["masks"], axis=-1, count=width)
        features = {k[8:]: z[k] for k in z.files if k.startswith("feature_")}
        data = ArrayDataset(
            images=torch.from_numpy(z["images"]),
            labels=torch.from_numpy(z["labels"]),
            masks=torch.from_numpy(masks),
            case_ids=tuple(str(c) for c in features["case_id"]),
        )
    return data, features


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
        return _load(path)
    data, features = generate_site(profile, image_size=image_size, seed=seed, temperature=temperature)
    _save(path, data, features)
    return data, features


def _meta(profile: SiteProfile, role: str) -> dict[str, object]:
    return {**dataclasses.asdict(profile), "role": role, "generator_version": GENERATOR_VERSION}


def synthesize_federation(opts: UltrasoundOptions, *, cache_dir: str | Path | None = None) -> Federation:
    """The default 6-site federation (+ external site), from the cache when it is there.

    Each training site is split stratified into train / val (``opts.val_fraction``, seed derived
    from (seed, site)). The external site exists only to be evaluated on: its ``val`` holds all its
    images and its ``train`` is an empty dataset of the same shape, so code that iterates
    ``federation.sites`` never trains on it by accident. ``cache_dir=None`` uses
    ``default_cache_dir()``. Per-site meta holds the profile fields (JSON-friendly scalars).
    """
    profiles, external = opts.profiles()
    kw = {"image_size": opts.image_size, "seed": opts.seed, "temperature": opts.temperature}

    def build(p: SiteProfile) -> ArrayDataset:
        return load_or_generate_site(p, cache_dir=cache_dir, **kw)[0]

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


def federation_oracle_auc(opts: UltrasoundOptions | None = None, *, external: bool = False) -> float:
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
