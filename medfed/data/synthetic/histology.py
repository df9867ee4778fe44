"""Synthetic multi-site H&E histology tiles with tumour masks, for federated segmentation.

Why: tumour segmentation on H&E is the other classic federated-pathology task, and it is hard
across hospitals for reasons that are easy to name - every lab's haematoxylin and eosin differ in
hue and strength, every scanner in focus, white level and compression - while the morphology the
label rests on (crowded, large, irregular, pleomorphic nuclei) is the same everywhere. This
generator gives tiles with exactly that split: biology shared, colour and optics per site, and a
pixel-exact tumour mask (1 = tumour) with a tile label (1 iff tumour covers at least
``TUMOUR_LABEL_FRACTION`` of the tile, so the data also serves classification).

How a tile is made (vectorised over a chunk of tiles, no per-pixel Python):

1. ``histology_sites.sample_tiles`` fixes the label, the tumour area, the tissue edge and the
   tile's stain matrix (site chemistry + slide-to-slide jitter).
2. Tumour regions: a smooth random field (coarse noise, bicubic upsampled) thresholded at the
   per-tile quantile that gives exactly the drawn area - zero, one or several blobs.
3. Normal tissue: glands (white lumen lined by epithelium with small round basal nuclei at even
   spacing - the organisation tumour loses), eosin-rich fibrous stroma (warped oriented fibres)
   with sparse elongated fibroblasts and dark round lymphocytes, and white glass at tissue edges.
4. Tumour: sheets of cells, nuclei on a dense jittered lattice, larger, elongated, rotated, with
   harmonic boundary wobble, variable size and darkness (pleomorphism), vesicular chromatin.
   Nuclei are stamped in small windows (scatter-max), so their cost is proportional to their area.
5. Beer-Lambert: concentration maps C_H, C_E (scaled by the site's staining strength) give
   OD = C_H h + C_E e per channel and intensity I = I0 exp(-OD); then the scanner: Gaussian blur,
   sensor noise, rounding, and a real JPEG round trip through Pillow.

Every draw derives from (seed, site name, purpose, chunk) via ``medfed.seeding``, so adding a site
never changes another, threads change speed but never bytes, and geometry draws do not depend on
the image size (the same tissue at 64 and 128 px). Sites are cached as .npz keyed by every
parameter and ``GENERATOR_VERSION``.
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
from scipy.ndimage import gaussian_filter

from medfed.data.site import ArrayDataset, Federation, Site
from medfed.data.stain import REFERENCE_IO, estimate_io, macenko_normalize
from medfed.data.synthetic.cache import default_cache_dir, load_site, render_chunks, save_site
from medfed.data.synthetic.histology_sites import (
    DEFAULT_EXTERNAL,
    DEFAULT_SITES,
    GLAND_NUCLEI,
    GLANDS,
    PUBLIC_SITES,
    STROMA_GRID,
    TUMOUR_GRID,
    TUMOUR_LABEL_FRACTION,
    HistologyCohort,
    HistologyOptions,
    HistologySiteProfile,
    draw_layout,
    rotate_toward,
    sample_tiles,
)
from medfed.data.synthetic.render import blend, sigmoid_
from medfed.seeding import derive_seed, numpy_rng

__all__ = [
    "DEFAULT_EXTERNAL",
    "DEFAULT_SITES",
    "GENERATOR_VERSION",
    "PUBLIC_SITES",
    "TUMOUR_LABEL_FRACTION",
    "HistologyCohort",
    "HistologyOptions",
    "HistologySiteProfile",
    "generate_histology_site",
    "load_or_generate_histology_site",
    "rotate_toward",
    "synthesize_histology_federation",
]

#: Bump whenever the pixels or labels a given set of parameters produces change (invalidates caches).
GENERATOR_VERSION = "1"

_TILES_PER_CHUNK = 32  # fixed in tiles (not pixels): geometry streams must not depend on the size
_F32 = np.float32


# --------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=64)
def _cubic_matrix(grid: int, size: int) -> np.ndarray:
    """(size, grid) matrix of torch's 1-D bicubic interpolation weights (align_corners=False)."""
    eye = torch.eye(grid, dtype=torch.float64).reshape(grid, 1, grid, 1)
    up = F.interpolate(eye, size=(size, 1), mode="bicubic", align_corners=False)
    return np.ascontiguousarray(up[:, 0, :, 0].T.numpy().astype(_F32))


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Smooth noise: bicubic interpolation of (B, C, g, g) grids to (B, C, size, size), float32.

    Bicubic interpolation is separable, so it is two small matrix products - several times
    faster than ``F.interpolate`` on many small images, and the same numbers.
    """
    a = _cubic_matrix(coarse.shape[-1], size)
    return np.matmul(np.matmul(a, coarse.astype(_F32)), a.T)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes (edges replicated), float32."""
    if sigma <= 0:
        return img
    return gaussian_filter(img, (0,) * (img.ndim - 2) + (sigma, sigma), mode="nearest")


def _top_fraction(field: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Per tile, the ``round(fraction * H * W)`` pixels where ``field`` is largest (exact count)."""
    b, h, w = field.shape
    flat = field.reshape(b, -1)
    count = np.rint(np.asarray(fraction) * h * w).astype(np.int64)
    srt = np.sort(flat, axis=1)
    thr = np.where(count > 0, srt[np.arange(b), np.clip(h * w - count, 0, h * w - 1)], np.inf)
    return (flat >= thr[:, None]).reshape(b, h, w)


def _stamp(
    out: np.ndarray, nuc: dict[str, np.ndarray], size: int, *, vesicular: bool = False
) -> None:
    """Scatter-max nuclei (haematoxylin concentration) into ``out`` (B, S, S).

    ``nuc``: tile index ``b``, centre ``x``/``y`` (tile units), semi-axes ``a`` >= ``c``, rotation
    ``theta``, boundary harmonics ``w`` (k = 2, 3 as cos/sin pairs) and darkness ``dark``. Each
    nucleus is evaluated in a window just large enough for its group's largest nucleus.
    """
    if len(nuc["b"]) == 0:
        return
    s = float(size)
    a, c = nuc["a"] * s, nuc["c"] * s  # px
    half = int(np.ceil(float(a.max()) * 1.2)) + 1
    offs = np.arange(-half, half + 1)
    cy, cx = nuc["y"] * s - 0.5, nuc["x"] * s - 0.5  # pixel-index coordinates of the centre
    rr = np.rint(cy).astype(np.int64)[:, None, None] + offs[None, :, None]
    cc = np.rint(cx).astype(np.int64)[:, None, None] + offs[None, None, :]
    valid = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
    dy = (rr - cy[:, None, None]).astype(_F32)
    dx = (cc - cx[:, None, None]).astype(_F32)

    def col(v: np.ndarray) -> np.ndarray:
        return v.astype(_F32)[:, None, None]

    cos_t, sin_t = col(np.cos(nuc["theta"])), col(np.sin(nuc["theta"]))
    u = (dx * cos_t + dy * sin_t) / col(a)
    v = (dy * cos_t - dx * sin_t) / col(c)
    rho = np.hypot(u, v)
    inv = 1.0 / np.maximum(rho, 1e-6)
    c1, s1 = u * inv, v * inv
    c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
    c3, s3 = c2 * c1 - s2 * s1, s2 * c1 + c2 * s1
    w = nuc["w"]
    radius = 1 + col(w[:, 0]) * c2 + col(w[:, 1]) * s2 + col(w[:, 2]) * c3 + col(w[:, 3]) * s3
    signed = (rho - radius) * col(np.sqrt(a * c))  # px, negative inside
    val = np.clip(0.5 - signed, 0.0, 1.0) * col(nuc["dark"])  # 1 px anti-aliased edge
    if vesicular:  # open chromatin: paler centre, dark rim
        val *= 1 - col(nuc["vesic"]) * np.clip(1 - np.square(rho / radius), 0.0, 1.0)
    val *= valid
    flat = (nuc["b"][:, None, None] * size + np.clip(rr, 0, size - 1)) * size
    flat = flat + np.clip(cc, 0, size - 1)
    np.maximum.at(out.reshape(-1), flat.ravel(), val.ravel())


def _at(field: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Values of a (B, S, S) map at tile-unit points (nearest pixel)."""
    size = field.shape[-1]
    row = np.clip((y * size).astype(np.int64), 0, size - 1)
    col = np.clip((x * size).astype(np.int64), 0, size - 1)
    return field[b, row, col]


def _lattice(grid: int, jitter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jittered lattice points (B, grid^2) in tile units; ``jitter`` (B, grid^2, 2) in cells."""
    i = np.arange(grid * grid)
    x = ((i % grid) + 0.5 + jitter[..., 0]) / grid
    y = ((i // grid) + 0.5 + jitter[..., 1]) / grid
    return np.clip(x, 0.0, 0.999), np.clip(y, 0.0, 0.999)


def _nuclei(
    g: dict[str, np.ndarray], tumour: np.ndarray, gland: np.ndarray, glass: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Nuclei of a chunk: (tumour nuclei, normal nuclei) as flat parameter arrays."""
    b = tumour.shape[0]
    tiles = np.arange(b)[:, None]
    # Tumour: lattice points that fall in the tumour.
    x, y = _lattice(TUMOUR_GRID, g["t_pos"])
    bb = np.broadcast_to(tiles, x.shape)
    keep = g["t_keep"] & _at(tumour, bb, x, y)
    elong = np.sqrt(g["t_elong"][keep])
    tum = {"b": bb[keep], "x": x[keep], "y": y[keep], "a": g["t_r"][keep] * elong,
           "c": g["t_r"][keep] / elong, "theta": g["t_theta"][keep], "w": g["t_wobble"][keep],
           "dark": g["t_dark"][keep], "vesic": g["t_vesic"][keep]}  # fmt: skip

    # Glands: basal nuclei evenly spaced around the lumen, elongated radially (columnar).
    rad_a, rad_b = g["g_ra"] + 0.55 * g["g_ring"], g["g_rb"] + 0.55 * g["g_ring"]
    perim = 2 * np.pi * np.sqrt((rad_a**2 + rad_b**2) / 2)
    n_g = np.minimum(np.rint(perim / g["g_spacing"]), GLAND_NUCLEI)
    k = np.arange(GLAND_NUCLEI)
    psi = 2 * np.pi * (k[None, None, :] + g["gn_jit"]) / n_g[..., None]
    ex, ey = rad_a[..., None] * np.cos(psi), rad_b[..., None] * np.sin(psi)
    th = g["g_theta"][..., None]
    gx = g["g_x"][..., None] + ex * np.cos(th) - ey * np.sin(th)
    gy = g["g_y"][..., None] + ex * np.sin(th) + ey * np.cos(th)
    gb = np.broadcast_to(tiles[..., None], gx.shape)
    inside = (gx >= 0) & (gx < 1) & (gy >= 0) & (gy < 1)
    ok = g["g_on"][..., None] & (k < n_g[..., None]) & inside
    ok[ok] = ~_at(tumour, gb[ok], gx[ok], gy[ok]) & (_at(glass, gb[ok], gx[ok], gy[ok]) < 0.5)
    normal_theta = np.arctan2(np.sin(psi) * rad_a[..., None], np.cos(psi) * rad_b[..., None])
    r = g["gn_r"][ok]
    zeros4 = np.zeros((int(ok.sum()), 4))
    gl = {"b": gb[ok], "x": gx[ok], "y": gy[ok], "a": r * 1.15, "c": r / 1.15,
          "theta": (normal_theta + th)[ok], "w": zeros4, "dark": g["gn_dark"][ok]}  # fmt: skip

    # Stroma: fibroblasts along the fibres, lymphocytes; only where there is stroma.
    x, y = _lattice(STROMA_GRID, g["s_pos"])
    bb = np.broadcast_to(tiles, x.shape)
    stroma = ~_at(tumour, bb, x, y) & (_at(gland, bb, x, y) < 0.3) & (_at(glass, bb, x, y) < 0.5)
    keep = g["s_keep"] & stroma
    lym = g["s_lymph"][keep]
    fib_theta = g["fibre_angle"][bb[keep]] + np.pi / 2 + g["s_theta"][keep]  # along the fibres
    st = {"b": bb[keep], "x": x[keep], "y": y[keep],
          "a": np.where(lym, 0.017, 0.036), "c": np.where(lym, 0.017, 0.0105),
          "theta": fib_theta, "w": np.zeros((int(keep.sum()), 4)),
          "dark": np.where(lym, 1.45, 0.9)}  # fmt: skip
    normal = {key: np.concatenate([gl[key], st[key]]) for key in gl}
    return tum, normal


def _render_chunk(
    p: HistologySiteProfile,
    tiles: dict[str, np.ndarray],
    size: int,
    g: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, B x 3 x S x S, before JPEG) and tumour masks (B x S x S) of one chunk."""
    b = len(tiles["label"])
    k = size / 64.0  # pixel scale of widths given at 64 px
    # Tumour: exact area by per-tile quantile of a smooth field; glass likewise, never on tumour.
    tum_field = _upsample(g["tum4"], size)[:, 0] + 0.35 * _upsample(g["tum8"], size)[:, 0]
    tumour = _top_fraction(tum_field, tiles["tumour_fraction"])
    glass = _top_fraction(_upsample(g["edge3"], size)[:, 0], tiles["edge_fraction"]) & ~tumour
    soft = 0.7 * k
    tum_soft = _blur(tumour.astype(_F32), soft)
    glass_s = _blur(glass.astype(_F32), soft)

    coord = (np.arange(size, dtype=_F32) + 0.5) / size
    X, Y = coord[None, None, :], coord[None, :, None]
    lumen = np.zeros((b, size, size), _F32)
    gland = np.zeros((b, size, size), _F32)
    for j in range(GLANDS):

        def gcol(key: str, j: int = j) -> np.ndarray:
            return g[key][:, j].astype(_F32)[:, None, None]

        du, dv = X - gcol("g_x"), Y - gcol("g_y")
        ct, st = np.cos(gcol("g_theta")), np.sin(gcol("g_theta"))
        d = np.hypot((du * ct + dv * st) / gcol("g_ra"), (dv * ct - du * st) / gcol("g_rb"))
        dist = (d - 1) * np.sqrt(gcol("g_ra") * gcol("g_rb")) * size  # px outside the lumen
        on = gcol("g_on")
        np.maximum(lumen, sigmoid_(dist * (-1 / 0.6)) * on, out=lumen)
        np.maximum(gland, sigmoid_((gcol("g_ring") * size - dist) * (1 / 0.6)) * on, out=gland)
    outside = (1 - tum_soft) * (1 - glass_s)
    lumen *= outside
    gland *= outside

    # Stroma: two warped wave trains at nearby angles and pitches - wavy collagen bundles that
    # cross and fray instead of a regular grating - plus fine pixel texture.
    smooth = _upsample(g["str5"], size)
    fine = _blur(rng.standard_normal((2, b, size, size), dtype=_F32), 0.6 * k)
    fibres = np.zeros((b, size, size), _F32)
    for j, (turn, pitch, amp) in enumerate(((0.0, 1.0, 0.65), (0.45, 1.45, 0.35))):
        angle = g["fibre_angle"] + turn
        phase = np.cos(angle).astype(_F32)[:, None, None] * X
        phase = phase + np.sin(angle).astype(_F32)[:, None, None] * Y
        phase *= (2 * np.pi * pitch * g["fibre_freq"]).astype(_F32)[:, None, None]
        fibres += amp * np.cos(phase + 2.5 * smooth[:, 1 + j])
    E = 0.5 * np.exp(0.2 * smooth[:, 0]) * (1 + 0.22 * fibres + 0.08 * fine[1])
    H = np.full_like(E, 0.07)
    H, E = blend(H, 0.12, gland), blend(E, 0.30, gland)  # epithelium
    H, E = blend(H, 0.01, lumen), blend(E, 0.02, lumen)
    H = blend(H, 0.2, tum_soft)  # tumour cytoplasm: less eosin, more haematoxylin (purple)
    E = blend(E, 0.32 * np.exp(0.15 * smooth[:, 0]), tum_soft)
    H *= 1 - glass_s
    E *= 1 - glass_s

    tum_nuc, normal_nuc = _nuclei(g, tumour, gland, glass_s)
    nuc = np.zeros((b, size, size), _F32)
    _stamp(nuc, tum_nuc, size, vesicular=True)
    _stamp(nuc, normal_nuc, size)
    nuc *= 1 + (0.15 + 0.35 * p.atypia * tum_soft) * fine[0]  # coarse chromatin in tumour
    np.maximum(nuc, 0, out=nuc)
    cover = np.minimum(nuc * (1 / 0.6), 1.0)
    H = H * (1 - cover) + nuc
    E *= 1 - 0.8 * cover

    # Site: staining strength, stain chemistry (Beer-Lambert), optics, sensor.
    scale = tiles["conc_scale"].astype(_F32)
    H *= scale[:, 0, None, None]
    E *= scale[:, 1, None, None]
    S = tiles["stain_matrix"].astype(_F32)  # (B, 3, 2)
    od = H[:, None] * S[:, :, 0, None, None] + E[:, None] * S[:, :, 1, None, None]
    img = _F32(p.background) * np.exp(-od)
    if p.blur > 0:
        img = _blur(img, p.blur * k)
    if p.noise > 0:
        img += _F32(p.noise) * rng.standard_normal(img.shape, dtype=_F32)
    images = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return images, tumour.astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of one (3, H, W) RGB tile through Pillow (4:2:0 chroma, as scanners do)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(
        buf, format="JPEG", quality=quality
    )
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def generate_histology_site(
    profile: HistologySiteProfile, *, image_size: int, seed: int
) -> tuple[ArrayDataset, dict[str, np.ndarray]]:
    """Generate one site: its dataset (RGB tiles, labels, tumour masks, case ids) and features.

    The feature table has one row per tile, in dataset order: ``case_id``, ``label``,
    ``tumour_fraction`` (of the mask), ``edge_fraction`` (drawn glass share), ``stain_matrix``
    (3 x 2, columns H, E: the tile's true unit OD vectors) and ``conc_scale`` (H, E strength).
    """
    n = profile.n_tiles
    tiles = sample_tiles(profile, n, seed=seed)
    starts = list(range(0, n, _TILES_PER_CHUNK))

    def render(c: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(starts[c], min(n, starts[c] + _TILES_PER_CHUNK))
        part = {key: v[sl] for key, v in tiles.items()}
        geo_rng = numpy_rng(seed, "histology", profile.name, "geometry", c)
        pix_rng = numpy_rng(seed, "histology", profile.name, "pixels", image_size, c)
        geo = draw_layout(geo_rng, len(part["label"]), atypia=profile.atypia)
        imgs, masks = _render_chunk(profile, part, image_size, geo, pix_rng)
        if profile.jpeg_quality is not None:
            imgs = np.stack([_jpeg(im, profile.jpeg_quality) for im in imgs])
        return imgs, masks

    parts = render_chunks(render, len(starts))
    images = np.concatenate([im for im, _ in parts])
    masks = np.concatenate([m for _, m in parts])
    fraction = masks.reshape(n, -1).mean(axis=1)
    labels = (fraction >= TUMOUR_LABEL_FRACTION).astype(np.int64)
    case_ids = tuple(f"{profile.name}-{i:05d}" for i in range(n))
    data = ArrayDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        masks=torch.from_numpy(masks),
        case_ids=case_ids,
    )
    features = {
        "case_id": np.array(case_ids),
        "label": labels,
        "tumour_fraction": fraction,
        "edge_fraction": tiles["edge_fraction"],
        "stain_matrix": tiles["stain_matrix"],
        "conc_scale": tiles["conc_scale"],
    }
    return data, features


# --------------------------------------------------------------------------------------------
# Federation and cache


def _cache_key(profile: HistologySiteProfile, image_size: int, seed: int) -> str:
    blob = json.dumps(
        {"version": GENERATOR_VERSION, "profile": dataclasses.asdict(profile),
         "image_size": image_size, "seed": seed},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_or_generate_histology_site(
    profile: HistologySiteProfile,
    *,
    image_size: int,
    seed: int,
    cache_dir: str | Path | None = None,
) -> tuple[ArrayDataset, dict[str, np.ndarray]]:
    """``generate_histology_site`` behind the on-disk cache (one .npz per site and parameters)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(profile, image_size, seed)
    path = root / "histology" / f"{profile.name}-{image_size}px-{key}.npz"
    if path.exists():
        return load_site(path)
    data, features = generate_histology_site(profile, image_size=image_size, seed=seed)
    save_site(path, data, features)
    return data, features


def _meta(profile: HistologySiteProfile, role: str, normalized: bool) -> dict[str, object]:
    return {**dataclasses.asdict(profile), "role": role, "stain_normalized": normalized,
            "generator_version": GENERATOR_VERSION}  # fmt: skip


def synthesize_histology_federation(
    opts: HistologyOptions, *, cache_dir: str | Path | None = None
) -> Federation:
    """The default 5-site histology federation (+ external site), from the cache when there.

    Each training site is split stratified into train / val (``opts.val_fraction``, seed derived
    from (seed, site)); the external site's ``val`` holds all its tiles and its ``train`` is empty,
    as for the ultrasound federation. The cache holds raw tiles; ``stain_normalize`` is applied
    after loading, per site, with one pooled Macenko estimate from that site's own tiles (enough
    pixels that tiles without nuclei do no harm) and that site's own glass level, toward the
    fixed reference stain, maximum concentrations and glass level (``medfed.data.stain``).
    """
    profiles, external = opts.profiles()

    def build(p: HistologySiteProfile) -> ArrayDataset:
        data = load_or_generate_histology_site(
            p, image_size=opts.image_size, seed=opts.seed, cache_dir=cache_dir
        )[0]
        if opts.stain_normalize:  # site-local: this site's own tiles, its own glass level
            images = macenko_normalize(
                data.images, io=estimate_io(data.images), target_io=REFERENCE_IO
            )
            data = dataclasses.replace(data, images=images)
        return data

    sites = []
    for p in profiles:
        split_seed = derive_seed(opts.seed, "histology", p.name, "split")
        meta = _meta(p, "train", opts.stain_normalize)
        sites.append(Site.from_dataset(p.name, build(p), val_fraction=opts.val_fraction,
                                       seed=split_seed, meta=meta))  # fmt: skip
    ext = None
    if external is not None:
        data = build(external)
        ext = Site(external.name, data.subset([]), data,
                   meta=_meta(external, "external", opts.stain_normalize))  # fmt: skip
    return Federation(tuple(sites), ext)
