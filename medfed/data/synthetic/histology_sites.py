"""Site profiles, cohorts, options, tile draws and tissue layout of the synthetic H&E federation.

This half of the generator never draws a pixel: it says what each hospital's lab and scanner do
to a section (stain chemistry, staining strength, focus, compression, glass brightness), how many
tiles a site holds and how many of them show tumour, and it draws everything that does not depend
on the image size - per tile (``sample_tiles``: label, tumour area, slide-to-slide stain variation,
tissue edge) and per chunk of tiles (``draw_layout``: noise grids, glands, candidate nuclei, in
tile units). So the same seed gives the same tiles - same labels, same stains, same tissue
layout - at 64 and 256 px; ``histology`` renders them.

Site effects, and why each one is there:

- ``stain_h`` / ``stain_e``: the optical-density (OD) direction of each dye. Dye batch, pH and
  oxidation rotate it (a "bluer" or "browner" haematoxylin, a "pinker" or "more orange" eosin).
  Profiles build them with ``rotate_toward`` from the canonical Ruifrok vectors.
- ``h_scale`` / ``e_scale``: staining strength (time in the dye, section thickness): every
  concentration is multiplied by it, so over-stained sites are darker in that stain.
- ``stain_jitter_deg`` / ``conc_jitter``: slide-to-slide variation inside one site (per tile).
- ``background``: I0, the scanner's white level (intensity of bare glass, 240-255).
- ``blur``: Gaussian optical blur (sigma in px at 64 px, scaled with the image size): focus.
- ``noise``: sensor noise (sd in grey levels) added after the optics.
- ``jpeg_quality``: the export's JPEG round trip (None = lossless).
- ``prevalence`` / ``n_tiles``: case mix and site size.
- ``atypia``: tumour grade - scales how large, irregular and pleomorphic tumour nuclei are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medfed.data.stain import RUIFROK_E, RUIFROK_H
from medfed.seeding import numpy_rng

Vec3 = tuple[float, float, float]

#: A tile is labelled tumour (1) when at least this fraction of its pixels are tumour.
TUMOUR_LABEL_FRACTION = 0.05
#: Tumour area fraction of a positive tile: uniform in this range (well above the label cut).
POSITIVE_FRACTION = (0.12, 0.85)
#: A negative tile holds an isolated tumour focus with this probability, of an area fraction
#: uniform in NEGATIVE_FOCUS_FRACTION (below the label cut: the mask is not empty, the label is 0).
NEGATIVE_FOCUS_P = 0.15
NEGATIVE_FOCUS_FRACTION = (0.004, 0.02)
#: Tissue layout: at most one gland per quadrant (glands rarely collide), basal nuclei per gland,
#: and the candidate lattices (cells per side) of tumour nuclei (dense) and stromal nuclei.
GLANDS = 4
GLAND_NUCLEI = 24
TUMOUR_GRID = 10
STROMA_GRID = 7
#: A tile shows a tissue edge (white glass) with this probability, covering this fraction of it.
EDGE_P = 0.25
EDGE_FRACTION = (0.05, 0.35)

_CANONICAL_H = tuple(float(x) for x in np.asarray(RUIFROK_H) / np.linalg.norm(RUIFROK_H))
_CANONICAL_E = tuple(float(x) for x in np.asarray(RUIFROK_E) / np.linalg.norm(RUIFROK_E))
CANONICAL_H: Vec3 = (_CANONICAL_H[0], _CANONICAL_H[1], _CANONICAL_H[2])
CANONICAL_E: Vec3 = (_CANONICAL_E[0], _CANONICAL_E[1], _CANONICAL_E[2])

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def rotate_toward(v: Vec3, degrees: float, toward: Vec3) -> Vec3:
    """Unit vector ``v`` rotated by ``degrees`` in the plane of ``v`` and ``toward``.

    In OD space "toward RED" means the dye absorbs more red light, so it *looks* bluer; toward
    BLUE it absorbs more blue and looks more yellow-brown / orange.
    """
    u = np.asarray(v, dtype=np.float64)
    u /= np.linalg.norm(u)
    t = np.asarray(toward, dtype=np.float64)
    t = t - (t @ u) * u
    t /= np.linalg.norm(t)
    r = np.cos(np.radians(degrees)) * u + np.sin(np.radians(degrees)) * t
    return (round(float(r[0]), 6), round(float(r[1]), 6), round(float(r[2]), 6))


@dataclass(frozen=True)
class HistologySiteProfile:
    """One hospital: its case mix, its staining lab and its slide scanner (see module docstring)."""

    name: str
    n_tiles: int
    prevalence: float
    stain_h: Vec3 = CANONICAL_H
    stain_e: Vec3 = CANONICAL_E
    h_scale: float = 1.0
    e_scale: float = 1.0
    stain_jitter_deg: float = 1.5
    conc_jitter: float = 0.06
    background: float = 245.0
    blur: float = 0.0
    noise: float = 1.0
    jpeg_quality: int | None = None
    atypia: float = 1.0
    description: str = ""

    def __post_init__(self) -> None:
        if self.n_tiles < 4:
            raise ValueError(f"site {self.name}: need at least 4 tiles, got {self.n_tiles}")
        if not 0.0 < self.prevalence < 1.0:
            raise ValueError(f"prevalence must be in (0, 1), got {self.prevalence}")
        if not 200.0 <= self.background <= 255.0:
            raise ValueError(f"background (I0) must be in [200, 255], got {self.background}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100] or None, got {self.jpeg_quality}")
        if min(self.h_scale, self.e_scale, self.atypia) <= 0 or min(self.blur, self.noise) < 0:
            raise ValueError("scales and atypia must be positive, blur and noise non-negative")
        for vec in (self.stain_h, self.stain_e):
            if len(vec) != 3 or min(vec) < 0 or abs(float(np.linalg.norm(vec)) - 1.0) > 1e-3:
                raise ValueError(f"stain vectors must be non-negative unit 3-vectors, got {vec}")

    @property
    def stain_matrix(self) -> np.ndarray:
        """The site's (3, 2) stain matrix, columns (H, E)."""
        return np.stack([np.asarray(self.stain_h), np.asarray(self.stain_e)], axis=1)

    def n_positive(self, n: int | None = None) -> int:
        """Tumour tiles among ``n`` (default ``n_tiles``): exact, and both classes kept >= 2."""
        n = self.n_tiles if n is None else n
        return int(min(max(round(self.prevalence * n), 2), n - 2))


DEFAULT_SITES: tuple[HistologySiteProfile, ...] = (
    HistologySiteProfile(
        "site-A", 1000, 0.50, background=246.0, blur=0.0, noise=1.0, jpeg_quality=95,
        description="academic centre: reference staining, high-end 40x scanner"),
    HistologySiteProfile(
        "site-B", 800, 0.35, stain_h=rotate_toward(CANONICAL_H, 9.0, RED),
        stain_e=rotate_toward(CANONICAL_E, 4.0, RED), h_scale=0.95, e_scale=1.30,
        background=242.0, blur=0.5, noise=1.5, jpeg_quality=85,
        description="blue haematoxylin, heavy eosin"),
    HistologySiteProfile(
        "site-C", 650, 0.60, stain_h=rotate_toward(CANONICAL_H, 8.0, BLUE),
        h_scale=1.30, e_scale=0.85, background=240.0, blur=0.9, noise=1.5, jpeg_quality=75,
        atypia=1.15, description="referral centre: over-stained brownish haematoxylin, older scanner"),
    HistologySiteProfile(
        "site-D", 500, 0.25, stain_e=rotate_toward(CANONICAL_E, 10.0, RED), h_scale=0.75,
        e_scale=0.90, background=250.0, blur=0.3, noise=1.0, jpeg_quality=70, atypia=0.9,
        description="screening population: faded haematoxylin, purple eosin, strong JPEG"),
    HistologySiteProfile(
        "site-E", 400, 0.45, stain_h=rotate_toward(CANONICAL_H, 6.0, GREEN),
        stain_e=rotate_toward(CANONICAL_E, 8.0, BLUE), e_scale=1.10, background=244.0,
        blur=1.3, noise=2.0, jpeg_quality=None, stain_jitter_deg=3.0, conc_jitter=0.12,
        description="soft focus, orange eosin, variable staining, lossless export"),
)  # fmt: skip

#: External validation site: a stain chemistry and scanner no training site uses.
DEFAULT_EXTERNAL = HistologySiteProfile(
    "site-F", 300, 0.50, stain_h=rotate_toward(CANONICAL_H, 14.0, GREEN),
    stain_e=rotate_toward(CANONICAL_E, 12.0, RED), h_scale=1.20, e_scale=1.40, background=252.0,
    blur=0.8, noise=2.0, jpeg_quality=60, atypia=1.2,
    description="external: different lab chemistry (green-shifted H, purple eosin), heavy JPEG",
)  # fmt: skip


class HistologyCohort(StrEnum):
    """Which tiles the generator draws: the private federation, or public archives to pretrain."""

    FEDERATION = "federation"
    PUBLIC = "public"


#: "Public" histology: two open archives a study may pretrain on before private training (for
#: example to warm-start a DP-SGD federation, where every private step is noisy). Same organ and
#: tissue model, but stains and scanners no federation site uses, and multi-centre stain
#: variation inside each archive; their own names, so their random streams share nothing with the
#: federation's tiles. Select with ``HistologyOptions(cohort="public")``.
PUBLIC_SITES: tuple[HistologySiteProfile, ...] = (
    HistologySiteProfile(
        "public-1", 1500, 0.45, stain_h=rotate_toward(CANONICAL_H, 12.0, BLUE),
        stain_e=rotate_toward(CANONICAL_E, 5.0, BLUE), h_scale=1.10, e_scale=0.80,
        background=248.0, blur=0.6, noise=1.5, jpeg_quality=80, stain_jitter_deg=5.0,
        conc_jitter=0.15, atypia=1.05,
        description="public archive 1: multi-centre slides, brownish H, pale orange eosin"),
    HistologySiteProfile(
        "public-2", 1500, 0.40, stain_h=rotate_toward(CANONICAL_H, 10.0, RED),
        stain_e=rotate_toward(CANONICAL_E, 14.0, RED), h_scale=0.85, e_scale=1.20,
        background=238.0, blur=1.0, noise=2.5, jpeg_quality=90, stain_jitter_deg=5.0,
        conc_jitter=0.15, atypia=0.95,
        description="public archive 2: challenge dataset, blue H, dark purple eosin, dim scanner"),
)  # fmt: skip


class HistologyOptions(BaseModel):
    """Options of the synthetic histology federation (what a config's ``data:`` block holds).

    ``stain_normalize`` is site-local on purpose: each site estimates its stains from its own
    tiles and maps them onto a *published constant* reference, so normalisation needs no
    communication, reveals nothing about a site's data, and treats an external (or late-joining)
    hospital exactly like a training site. A federation-wide estimate would need every site's
    stain statistics - a leak, and impossible for a site that was not there when it was made.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(
        64, ge=32, le=1024, description="Tile side in pixels (a multiple of 16); the field of "
        "view is fixed, so larger tiles show the same tissue at higher resolution.",
    )  # fmt: skip
    tiles_scale: float = Field(
        1.0, gt=0.0, description="Multiplies every site's tile count (rounded, at least 8, both "
        "classes at least 2): small values give tiny test federations.",
    )  # fmt: skip
    seed: int = Field(0, ge=0, description="Root seed: every draw derives from (seed, site).")
    cohort: HistologyCohort = Field(
        HistologyCohort.FEDERATION, description="federation: the 5 hospitals (+ external site); "
        "public: two open archives with other stains and scanners, to pretrain on (no external "
        "site) - e.g. the warm start of a DP-SGD federation.",
    )  # fmt: skip
    num_sites: int = Field(
        len(DEFAULT_SITES), ge=1, le=len(DEFAULT_SITES),
        description="Keep the first k training sites of the cohort (the others are not generated).",
    )  # fmt: skip
    external: bool = Field(True, description="Add the external validation site (all tiles in val).")
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Stratified validation share of each training site."
    )
    stain_normalize: bool = Field(
        False, description="Macenko-normalise each site's tiles at that site, from that site's "
        "own tiles only, toward the fixed reference stain (medfed.data.stain): no pixels or stain "
        "statistics cross sites, and the external site is normalised the same way.",
    )  # fmt: skip

    @field_validator("image_size")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {v}")
        return v

    @model_validator(mode="after")
    def _public_has_no_external(self) -> HistologyOptions:
        # The external site judges the federation; pretraining on it would leak the test.
        if self.cohort is HistologyCohort.PUBLIC and self.external:
            raise ValueError("the public cohort has no external site: set external: false")
        return self

    def profiles(
        self,
    ) -> tuple[tuple[HistologySiteProfile, ...], HistologySiteProfile | None]:
        """The (scaled) training profiles and the external one (None if disabled)."""

        def scaled(p: HistologySiteProfile) -> HistologySiteProfile:
            if self.tiles_scale == 1.0:
                return p
            return dataclasses.replace(p, n_tiles=max(8, round(p.n_tiles * self.tiles_scale)))

        pool = PUBLIC_SITES if self.cohort is HistologyCohort.PUBLIC else DEFAULT_SITES
        sites = tuple(scaled(p) for p in pool[: self.num_sites])
        return sites, scaled(DEFAULT_EXTERNAL) if self.external else None


def _rotate_rows(v: np.ndarray, degrees: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate unit vector ``v`` by ``degrees`` (one per row) toward random tangent directions."""
    t = rng.standard_normal((len(degrees), 3))
    t -= (t @ v)[:, None] * v[None, :]
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    rad = np.radians(degrees)[:, None]
    out = np.cos(rad) * v[None, :] + np.sin(rad) * t
    out = np.abs(out)  # OD vectors stay in the positive octant
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def sample_tiles(profile: HistologySiteProfile, n: int, *, seed: int) -> dict[str, np.ndarray]:
    """Per-tile facts of a site of ``n`` tiles, independent of the image size.

    ``label`` (exactly ``profile.n_positive(n)`` ones, in random order), ``tumour_fraction``
    (target tumour area: 0 or a sub-threshold focus for negatives), ``edge_fraction`` (white
    glass), ``stain_matrix`` (n, 3, 2) after slide-to-slide jitter and ``conc_scale`` (n, 2).
    """
    rng = numpy_rng(seed, "histology", profile.name, "tiles")
    label = np.zeros(n, dtype=np.int64)
    label[rng.permutation(n)[: profile.n_positive(n)]] = 1
    frac = np.where(label == 1, rng.uniform(*POSITIVE_FRACTION, n), 0.0)
    focus = (label == 0) & (rng.random(n) < NEGATIVE_FOCUS_P)
    frac = np.where(focus, rng.uniform(*NEGATIVE_FOCUS_FRACTION, n), frac)
    edge = np.where(rng.random(n) < EDGE_P, rng.uniform(*EDGE_FRACTION, n), 0.0)
    jit = profile.stain_jitter_deg
    h = _rotate_rows(np.asarray(profile.stain_h), np.abs(rng.normal(0, jit, n)), rng)
    e = _rotate_rows(np.asarray(profile.stain_e), np.abs(rng.normal(0, jit, n)), rng)
    scale = np.exp(rng.normal(0.0, profile.conc_jitter, (n, 2)))
    scale *= np.array([profile.h_scale, profile.e_scale])
    return {
        "label": label,
        "tumour_fraction": frac,
        "edge_fraction": edge,
        "stain_matrix": np.stack([h, e], axis=2),
        "conc_scale": scale,
    }


# --------------------------------------------------------------------------------------------
# Tissue layout (size-independent draws, tile units: the tile is [0, 1)^2)


def draw_layout(rng: np.random.Generator, b: int, *, atypia: float) -> dict[str, np.ndarray]:
    """Every random choice of the tissue layout of ``b`` tiles that does not depend on the pixels.

    Coarse noise grids (tumour field, tissue edge, stroma density and fibre warp), fibre angle and
    pitch, glands (one candidate per quadrant, 0-4 present) with their basal nuclei, and the
    jittered lattices of candidate tumour and stromal nuclei with each nucleus's size, shape,
    rotation, boundary harmonics and darkness (pleomorphism scaled by ``atypia``). The renderer
    keeps the candidates that fall in the right tissue.
    """
    g: dict[str, np.ndarray] = {
        "tum4": rng.standard_normal((b, 1, 4, 4)),
        "tum8": rng.standard_normal((b, 1, 8, 8)),
        "edge3": rng.standard_normal((b, 1, 3, 3)),
        "str5": rng.standard_normal((b, 3, 5, 5)),  # eosin density, two fibre warps
        "fibre_angle": rng.uniform(0, np.pi, b),
        "fibre_freq": rng.uniform(8.0, 12.0, b),
    }
    # Glands: one candidate per quadrant, 0-4 present.
    count = rng.choice(5, size=b, p=[0.12, 0.28, 0.30, 0.18, 0.12])
    present = rng.random((b, GLANDS)).argsort(axis=1).argsort(axis=1) < count[:, None]
    quad = np.arange(GLANDS)
    g["g_on"] = present
    g["g_x"] = (quad % 2) * 0.5 + rng.uniform(0.17, 0.33, (b, GLANDS))
    g["g_y"] = (quad // 2) * 0.5 + rng.uniform(0.17, 0.33, (b, GLANDS))
    g["g_ra"] = rng.uniform(0.05, 0.12, (b, GLANDS))
    g["g_rb"] = rng.uniform(0.05, 0.12, (b, GLANDS))
    g["g_theta"] = rng.uniform(0, np.pi, (b, GLANDS))
    g["g_ring"] = 0.045 * rng.uniform(0.85, 1.2, (b, GLANDS))
    g["g_spacing"] = 0.05 * rng.uniform(0.9, 1.1, (b, GLANDS))
    g["gn_jit"] = rng.normal(0, 0.08, (b, GLANDS, GLAND_NUCLEI))  # angle jitter, in spacings
    g["gn_r"] = 0.021 * np.exp(rng.normal(0, 0.06, (b, GLANDS, GLAND_NUCLEI)))
    g["gn_dark"] = 1.05 * np.exp(rng.normal(0, 0.05, (b, GLANDS, GLAND_NUCLEI)))
    # Tumour nuclei on a jittered lattice: larger, elongated, irregular, pleomorphic.
    m = TUMOUR_GRID * TUMOUR_GRID
    g["t_pos"] = rng.uniform(-0.35, 0.35, (b, m, 2))
    g["t_keep"] = rng.random((b, m)) < 0.9
    g["t_r"] = np.clip(0.036 * np.exp(rng.normal(0, 0.2 * atypia, (b, m))), 0.022, 0.05)
    g["t_elong"] = np.clip(1 + np.abs(rng.normal(0, 0.3 * atypia, (b, m))), 1.0, 1.8)
    g["t_theta"] = rng.uniform(0, np.pi, (b, m))
    g["t_wobble"] = np.clip(rng.normal(0, 0.07 * atypia, (b, m, 4)), -0.15, 0.15)
    g["t_dark"] = 1.3 * np.exp(rng.normal(0, 0.16 * atypia, (b, m)))
    g["t_vesic"] = rng.uniform(0, 0.4, (b, m))
    # Stroma: sparse fibroblasts (elongated along the fibres) and lymphocytes (small, dark, round).
    m = STROMA_GRID * STROMA_GRID
    g["s_pos"] = rng.uniform(-0.4, 0.4, (b, m, 2))
    g["s_keep"] = rng.random((b, m)) < 0.45
    g["s_lymph"] = rng.random((b, m)) < 0.3
    g["s_theta"] = rng.normal(0, 0.2, (b, m))
    return g
