"""Site profiles, case (feature + label) model and probe geometry of the synthetic ultrasound.

This half of the generator never draws tissue: it decides *what* each case is (its TI-RADS-like
nodule features, its label and the geometry its image will be drawn from), where each probe's
pixels lie in centimetres, and what text a scanner burns into the frame. Keeping it separate
from the renderer means the labels and features of a site do not depend on the image size, so the
64 px CPU presets and the 224 px GPU presets study exactly the same patients.

Label model (why it looks like this). Each nodule gets ACR TI-RADS-like points::

    composition      cystic 0, mixed cystic-solid 1, solid 2
    echogenicity     anechoic 0, hyperechoic 1, isoechoic 1, hypoechoic 2, very hypoechoic 3
    shape            taller-than-wide 3
    margin           smooth 0, lobulated 1, irregular 2
    echogenic foci   none 0, comet-tail 0, macrocalcification 1, punctate (microcalcification) 3

    score = points - SCORE_INTERCEPT,   logit = score / temperature,   label ~ Bernoulli(sigmoid(logit))

The label is drawn *from* the features, so the features cause malignancy and a model that reads
them perfectly still meets label noise: the oracle (true-logit) AUC is about 0.925 at the default
temperature (0.85), not 1. Raise ``temperature`` for noisier labels (lower oracle AUC), lower it for
cleaner ones.

Exact class counts by selection. Real cohorts have fixed counts (the reference study: 5,375
malignant / 3,082 benign), but Bernoulli labels do not. ``sample_site_cases`` therefore draws
i.i.d. candidate cases (features, then label), and keeps the first ``n_malignant`` candidates
labelled 1 and the first ``n_benign`` labelled 0. Because candidates are i.i.d., the kept cases
are i.i.d. draws from P(features | label) of the generative model: the selection changes the
prevalence only, never what a malignant or benign nodule looks like.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

COMPOSITION = ("cystic", "mixed", "solid")
ECHOGENICITY = ("anechoic", "hyperechoic", "isoechoic", "hypoechoic", "very_hypoechoic")
MARGIN = ("smooth", "lobulated", "irregular")
FOCI = ("none", "comet_tail", "macrocalcification", "punctate")

COMPOSITION_POINTS = np.array([0, 1, 2])
ECHO_POINTS = np.array([0, 1, 1, 2, 3])
TTW_POINTS = 3
MARGIN_POINTS = np.array([0, 1, 2])
FOCI_POINTS = np.array([0, 0, 1, 3])
SCORE_INTERCEPT = 4.5
#: logit = (points - 4.5) / 0.85 gives a pooled oracle AUC of about 0.925 on the default federation
#: (0.94 at 0.7, 0.92 at 0.9).
DEFAULT_TEMPERATURE = 0.85

# Base priors (before a site's ``suspicion`` tilt). Conditional on composition where anatomy says
# so: a pure cyst is anechoic, rarely taller-than-wide and carries comet tails, not calcifications.
_P_COMPOSITION = np.array([0.15, 0.25, 0.60])
_P_ECHO_SOLID = np.array([0.0, 0.12, 0.33, 0.43, 0.12])
_P_TTW = np.array([0.04, 0.22, 0.22])  # by composition
_P_MARGIN = np.array([[0.85, 0.15, 0.0], [0.50, 0.27, 0.23], [0.50, 0.27, 0.23]])
_P_FOCI = np.array([[0.70, 0.30, 0.0, 0.0], [0.60, 0.15, 0.10, 0.15], [0.60, 0.0, 0.15, 0.25]])

# Physical layout (cm). Linear: the image is the probe footprint; sector (curvilinear): the fan's
# apex sits SECTOR_APEX above the skin. Display windows are square so pixels are isotropic and a
# taller-than-wide nodule really is taller than wide on screen.
LINEAR_WINDOW = (-2.2, 2.2, -0.2, 4.2)  # x0, x1, z0, z1
LINEAR_HALF_WIDTH = 1.9
SECTOR_WINDOW = (-2.5, 2.5, -0.4, 4.6)
SECTOR_APEX, SECTOR_R1, SECTOR_HALF_ANGLE = 1.0, 5.2, 0.5


@dataclass(frozen=True)
class SiteProfile:
    """One hospital: its case mix and the scanner/export chain its images went through.

    Every field is a knob real multi-site data turns: ``gain`` (dB, brightness), ``dynamic_range_db``
    (log-compression range: lower = harsher contrast), ``gamma`` (display curve), ``speckle_grain``
    (point-spread width relative to a high-frequency linear probe: lower probe frequency, coarser
    speckle), ``blur`` (extra display blur, px at 64 px), ``resolution`` (fraction of native
    sampling kept by the export: 0.5 = downsampled 2x and upsampled back), ``attenuation_db``
    (residual depth falloff after time-gain compensation), ``text_overlay`` (burned-in caption,
    depth scale and markers - a classic shortcut), ``jpeg_quality`` (None = lossless export) and
    ``suspicion`` (shifts the feature priors: referral centres see more suspicious nodules).
    """

    name: str
    n_benign: int
    n_malignant: int
    probe: Literal["linear", "sector"] = "linear"
    gain: float = 0.0
    dynamic_range_db: float = 50.0
    gamma: float = 1.0
    speckle_grain: float = 1.0
    blur: float = 0.0
    resolution: float = 1.0
    attenuation_db: float = 8.0
    text_overlay: bool = False
    overlay_text: str = "THY"
    overlay_level: int = 240
    jpeg_quality: int | None = None
    suspicion: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        if self.probe not in ("linear", "sector"):
            raise ValueError(f"probe must be 'linear' or 'sector', got {self.probe!r}")
        if self.n_benign < 0 or self.n_malignant < 0 or self.n_benign + self.n_malignant == 0:
            raise ValueError(f"site {self.name}: need a positive number of cases")
        if not 0.1 <= self.resolution <= 1.0:
            raise ValueError(f"resolution must be in [0.1, 1], got {self.resolution}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100] or None, got {self.jpeg_quality}")

    @property
    def n(self) -> int:
        return self.n_benign + self.n_malignant


# Counts mirror the reference study: 8,457 images, 5,375 malignant / 3,082 benign, unequal sizes
# and prevalences (55-72 % malignant).
DEFAULT_SITES: tuple[SiteProfile, ...] = (
    SiteProfile("site1", 850, 1650, "linear", gain=0.0, dynamic_range_db=50, gamma=1.0,
                speckle_grain=0.8, attenuation_db=6, text_overlay=True, overlay_text="THY",
                jpeg_quality=92, suspicion=0.2, description="academic centre, high-end linear"),
    SiteProfile("site2", 798, 1102, "linear", gain=4.0, dynamic_range_db=52, gamma=0.9,
                speckle_grain=1.1, blur=0.4, attenuation_db=8, jpeg_quality=None,
                suspicion=-0.1, description="bright presets, lossless DICOM export"),
    SiteProfile("site3", 450, 1050, "sector", gain=-2.0, dynamic_range_db=45, gamma=1.1,
                speckle_grain=1.4, blur=0.3, attenuation_db=10, text_overlay=True,
                overlay_text="NECK", overlay_level=225, jpeg_quality=80, suspicion=0.3,
                description="curvilinear probe, referral centre"),
    SiteProfile("site4", 540, 660, "linear", gain=-5.0, dynamic_range_db=48, gamma=1.2,
                speckle_grain=0.9, blur=0.6, attenuation_db=12, text_overlay=True,
                overlay_text="L12-5", overlay_level=250, jpeg_quality=65, suspicion=-0.3,
                description="dark presets, heavy JPEG, screening population"),
    SiteProfile("site5", 224, 576, "linear", gain=2.0, dynamic_range_db=52, gamma=1.0,
                speckle_grain=1.0, resolution=0.5, attenuation_db=7, jpeg_quality=85,
                suspicion=0.4, description="low-resolution video capture"),
    SiteProfile("site6", 220, 337, "linear", gain=1.0, dynamic_range_db=60, gamma=0.95,
                speckle_grain=1.2, blur=0.8, resolution=0.75, attenuation_db=9,
                text_overlay=True, overlay_text="THYR", overlay_level=230, jpeg_quality=75,
                description="older scanner, low contrast"),
)  # fmt: skip

#: External validation: a curvilinear probe at a gain and speckle grain no training site uses.
DEFAULT_EXTERNAL = SiteProfile(
    "site7", 50, 50, "sector", gain=7.0, dynamic_range_db=42, gamma=0.8, speckle_grain=2.0,
    blur=0.5, attenuation_db=16, text_overlay=True, overlay_text="C5-1", overlay_level=255,
    jpeg_quality=70, description="external: low-frequency curvilinear probe, very bright presets",
)  # fmt: skip


def site_seed(seed: int, name: str, *purpose: int) -> np.random.SeedSequence:
    """Seed stream for (seed, site, purpose...): adding or reordering sites never changes others."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.SeedSequence([int(seed), key, *purpose])


def _tilted(p: np.ndarray, points: np.ndarray, suspicion: float) -> np.ndarray:
    """Tilt a categorical prior towards high-point categories by exp(suspicion * points / 3)."""
    w = p * np.exp(suspicion * np.asarray(points, dtype=float) / 3.0)
    return w / w.sum(axis=-1, keepdims=True)


def _choice(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """Vectorised categorical draw, one row of ``probs`` per case."""
    cdf = np.cumsum(probs, axis=-1)
    cdf[..., -1] = 1.0
    n = int(probs.shape[0])
    return (rng.random(n)[:, None] > cdf).sum(axis=-1)


def sample_features(
    rng: np.random.Generator, n: int, suspicion: float = 0.0
) -> dict[str, np.ndarray]:
    """Draw ``n`` i.i.d. nodules' categorical features from a site's (tilted) priors."""
    s = suspicion
    comp = _choice(rng, np.tile(_tilted(_P_COMPOSITION, COMPOSITION_POINTS, s), (n, 1)))
    echo = _choice(rng, np.tile(_tilted(_P_ECHO_SOLID, ECHO_POINTS, s), (n, 1)))
    echo[comp == 0] = 0
    p_ttw = _P_TTW[comp] * np.exp(s) / (1 - _P_TTW[comp] + _P_TTW[comp] * np.exp(s))
    ttw = rng.random(n) < p_ttw
    margin = _choice(rng, _tilted(_P_MARGIN, MARGIN_POINTS, s)[comp])
    foci = _choice(rng, _tilted(_P_FOCI, FOCI_POINTS, s)[comp])
    return {"composition": comp, "echogenicity": echo, "taller_than_wide": ttw,
            "margin": margin, "foci": foci}  # fmt: skip


def tirads_points(f: dict[str, np.ndarray]) -> np.ndarray:
    return (
        COMPOSITION_POINTS[f["composition"]]
        + ECHO_POINTS[f["echogenicity"]]
        + TTW_POINTS * np.asarray(f["taller_than_wide"], dtype=np.int64)
        + MARGIN_POINTS[f["margin"]]
        + FOCI_POINTS[f["foci"]]
    )


def sample_site_cases(
    profile: SiteProfile, *, seed: int, temperature: float = DEFAULT_TEMPERATURE
) -> dict[str, np.ndarray]:
    """Features, points, logit and label of every case of a site, with exact class counts.

    Candidates are drawn in batches until both quotas can be met; the kept cases are the first
    ``n_malignant`` positives and first ``n_benign`` negatives, in candidate order (see module
    docstring for why this preserves P(features | label)).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rng = np.random.default_rng(site_seed(seed, profile.name, 0))
    batch = max(256, 2 * profile.n)
    parts: list[dict[str, np.ndarray]] = []
    n_pos = n_neg = 0
    while n_pos < profile.n_malignant or n_neg < profile.n_benign:
        f = sample_features(rng, batch, profile.suspicion)
        f["points"] = tirads_points(f)
        f["logit"] = (f["points"] - SCORE_INTERCEPT) / temperature
        f["label"] = (rng.random(batch) < 1.0 / (1.0 + np.exp(-f["logit"]))).astype(np.int64)
        parts.append(f)
        n_pos += int(f["label"].sum())
        n_neg += int(batch - f["label"].sum())
    cand = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    pos = np.flatnonzero(cand["label"] == 1)[: profile.n_malignant]
    neg = np.flatnonzero(cand["label"] == 0)[: profile.n_benign]
    keep = np.sort(np.concatenate([pos, neg]))
    out = {k: v[keep] for k, v in cand.items()}
    out["taller_than_wide"] = out["taller_than_wide"].astype(bool)
    return out


N_HARMONICS = 8  # boundary harmonics k = 2..9
N_BLOBS = 3  # cystic spaces of a mixed nodule
N_FOCI = 6  # echogenic foci per nodule (at most)
ECHO_POWER = np.array([0.004, 2.5, 0.5, 0.2, 0.06])  # relative to thyroid parenchyma


def sample_geometry(
    profile: SiteProfile, cases: dict[str, np.ndarray], *, seed: int
) -> dict[str, np.ndarray]:
    """Per-case anatomy and nodule geometry (cm), drawn from each case's features.

    Sizes are physical, so a case looks the same at 64 and 224 px. The features fix the *kind*
    of shape (aspect ratio band, harmonic amplitudes, foci count); everything else is nuisance
    variation the classifier has to see through.
    """
    rng = np.random.default_rng(site_seed(seed, profile.name, 1))
    comp, echo, margin, foci = (cases[k] for k in ("composition", "echogenicity", "margin", "foci"))
    ttw = cases["taller_than_wide"].astype(bool)
    n = len(comp)

    def u(lo: float, hi: float, size: int | tuple[int, ...] = n) -> np.ndarray:
        """``size`` i.i.d. uniforms in [lo, hi): one per case unless a shape is given."""
        return rng.uniform(lo, hi, size)

    sector = profile.probe == "sector"
    g: dict[str, np.ndarray] = {"side": rng.choice([-1.0, 1.0], n)}
    g["tx"] = u(-0.15, 0.15) if sector else u(-0.3, 0.3)
    g["tz"], ta0, tb0 = u(1.7, 2.1), u(0.9, 1.2), u(0.75, 0.95)
    r = np.clip(rng.lognormal(np.log(0.55), 0.25, n), 0.32, 0.9)
    aspect = np.where(ttw, u(1.2, 1.8), u(0.5, 0.92))
    na, nb = r / np.sqrt(aspect), r * np.sqrt(aspect)
    shrink = np.minimum(1.0, 1.0 / na)  # lateral semi-axis at most 1 cm
    na, nb = na * shrink, nb * shrink
    tilt = np.clip(rng.normal(0.0, 0.12, n), -0.25, 0.25)
    lim = (1.4 if sector else 1.75) - 1.15 * na
    g["nx"] = np.clip(g["tx"] + u(-0.4, 0.4), -lim, lim)
    g["nz"] = np.clip(g["tz"] + u(-0.2, 0.2), 0.45 + 1.15 * nb, 3.9 - 1.15 * nb)
    g["na"], g["nb"], g["nr"] = na, nb, np.sqrt(na * nb)
    g["cos_t"], g["sin_t"] = np.cos(tilt), np.sin(tilt)
    g["ta"] = np.maximum(ta0, np.abs(g["nx"] - g["tx"]) + 1.25 * na + 0.1)
    g["tb"] = np.maximum(tb0, np.abs(g["nz"] - g["tz"]) + 1.25 * nb + 0.1)

    # Margin: radial Fourier perturbation r(theta) = r0 (1 + sum a_k cos(k theta + phi_k)).
    amp = np.zeros((n, N_HARMONICS))
    amp[:, :2] = np.abs(rng.normal(0.0, 0.03, (n, 2)))  # every nodule is a little out of round
    lob = margin == 1
    for _ in range(2):  # two lobulations among k = 3..5
        k = rng.integers(1, 4, n)
        amp[lob, k[lob]] = u(0.09, 0.15)[lob]
    irr = margin == 2
    amp[irr, 2:] = u(0.04, 0.09, (n, N_HARMONICS - 2))[irr]
    amp[irr, 1] = u(0.0, 0.06)[irr]
    amp *= np.minimum(1.0, 0.55 / amp.sum(axis=1, keepdims=True))
    coef = amp * np.exp(1j * rng.uniform(0, 2 * np.pi, (n, N_HARMONICS)))
    g["coef_re"], g["coef_im"] = coef.real, coef.imag

    g["level"] = ECHO_POWER[echo] * np.exp(rng.normal(0.0, 0.12, n))
    g["texture"] = np.where(echo == 2, u(0.35, 0.6), u(0.1, 0.35))  # iso: coarser
    g["halo"] = ((echo == 1) | (echo == 2)) & (margin == 0) & (rng.random(n) < 0.7)
    g["wall"] = np.select([comp == 0, comp == 1], [1.0, 0.5], 0.0)
    g["alpha_in"] = np.select([comp == 0, comp == 1, echo == 4], [-0.9, -0.4, 0.3], 0.0)
    ang = rng.uniform(0, 2 * np.pi, (n, N_BLOBS))
    rad = 0.45 * np.sqrt(rng.random((n, N_BLOBS)))
    g["blob_u"], g["blob_v"] = rad * np.cos(ang), rad * np.sin(ang)
    g["blob_r"] = rng.uniform(0.25, 0.5, (n, N_BLOBS))
    g["blob_on"] = (comp == 1)[:, None] & (
        (np.arange(N_BLOBS) == 0) | (rng.random((n, N_BLOBS)) < 0.6)
    )

    # Echogenic foci, placed well inside the nodule (normalised radius < 0.55), mapped to cm.
    ang = rng.uniform(0, 2 * np.pi, (n, N_FOCI))
    rad = 0.55 * np.sqrt(rng.random((n, N_FOCI)))
    du, dv = rad * np.cos(ang) * na[:, None], rad * np.sin(ang) * nb[:, None]
    c, s = g["cos_t"][:, None], g["sin_t"][:, None]
    g["fx"] = g["nx"][:, None] + du * c - dv * s
    g["fz"] = g["nz"][:, None] + du * s + dv * c
    count = np.select(
        [foci == 3, foci == 2, foci == 1], [rng.integers(2, 7, n), 1, rng.integers(1, 3, n)], 0
    )
    on = np.arange(N_FOCI)[None, :] < count[:, None]
    g["f_r"] = (
        np.select([foci == 2, foci == 1], [u(0.1, 0.15), np.full(n, 0.06)], 0.075)[:, None] * on
    )
    g["f_amp"] = np.select([foci == 2, foci == 1], [u(5, 7), u(3, 4)], u(4, 7))[:, None] * on
    g["f_shadow"] = (
        np.select([foci == 2, foci == 3], [np.full(n, 2.0), np.full(n, 0.25)], 0.0)[:, None] * on
    )
    g["f_tail"] = (foci == 1).astype(float)[:, None] * on

    g["het"] = u(0.08, 0.3)
    g["fat_bottom"], g["strap_bottom"] = u(0.25, 0.4), u(0.75, 1.0)
    g["cx"] = g["tx"] + g["side"] * (g["ta"] + 0.5)
    g["cz"], g["rc"] = g["tz"] + u(-0.1, 0.2), u(0.28, 0.4)
    g["rq"] = u(0.6, 0.8)
    g["qx"] = g["tx"] - g["side"] * (g["ta"] + 0.5 * g["rq"])
    g["qz"] = g["tz"] - 0.1 + 0.4 * g["rq"]
    g["focus_depth"], g["frame"] = u(1.2, 2.6), rng.integers(0, 100, n).astype(float)
    return {k: np.asarray(v, dtype=np.float64) for k, v in g.items()}


# --------------------------------------------------------------------------------------------
# Probe geometry


@lru_cache(maxsize=16)
def probe_grids(probe: str, size: int) -> dict[str, np.ndarray]:
    """Acquisition grid (rows = depth along the beam) and display grid, in cm, as (1, H, W).

    Linear: acquisition grid = display grid. Sector: acquisition is (radius, angle) and the
    display pixels look it up by scan conversion; outside the fan is black. ``index`` maps a
    point (x, z) in cm to fractional acquisition (row, col) - used to stamp small foci.
    """
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    if probe == "linear":
        x0, x1, z0, z1 = LINEAR_WINDOW
        X, Z = np.meshgrid(x0 + (x1 - x0) * c, z0 + (z1 - z0) * c)
        foot = (np.abs(X) <= LINEAR_HALF_WIDTH) & (Z >= 0.0)
        g = {"X": X, "Z": Z, "D": np.maximum(Z, 0.0), "Xd": X, "Zd": Z, "foot": foot}
        g["step"] = np.array((z1 - z0) / size)
        g["depth"] = np.clip(Z / z1, 0.0, 1.0)
        g["index"] = np.array([z0, (z1 - z0) / size, x0, (x1 - x0) / size])
    else:
        r = SECTOR_APEX + (SECTOR_R1 - SECTOR_APEX) * c
        th = SECTOR_HALF_ANGLE * (2.0 * c - 1.0)
        R, TH = np.meshgrid(r, th, indexing="ij")
        x0, x1, z0, z1 = SECTOR_WINDOW
        Xd, Zd = np.meshgrid(x0 + (x1 - x0) * c, z0 + (z1 - z0) * c)
        rd, thd = np.hypot(Xd, Zd + SECTOR_APEX), np.arctan2(Xd, Zd + SECTOR_APEX)
        foot = (rd >= SECTOR_APEX) & (rd <= SECTOR_R1) & (np.abs(thd) <= SECTOR_HALF_ANGLE)
        span = SECTOR_R1 - SECTOR_APEX
        g = {"X": R * np.sin(TH), "Z": R * np.cos(TH) - SECTOR_APEX, "D": R - SECTOR_APEX}
        g.update(
            Xd=Xd, Zd=Zd, foot=foot, step=np.array(span / size), depth=(R - SECTOR_APEX) / span
        )
        g["sample"] = np.stack([thd / SECTOR_HALF_ANGLE, 2 * (rd - SECTOR_APEX) / span - 1], -1)
        g["index"] = np.array(
            [SECTOR_APEX, span / size, -SECTOR_HALF_ANGLE, 2 * SECTOR_HALF_ANGLE / size]
        )
    out = {}
    for k, v in g.items():
        v = v.astype(np.float32) if v.dtype == np.float64 and v.ndim >= 2 else v
        v = v[None] if v.ndim >= 2 else v
        v.setflags(write=False)
        out[k] = v
    return out


# Burned-in text: a 3x5 bitmap font (rows top to bottom, '#' = lit). Scanner captions, a depth
# scale and markers are what real exports carry, and what a CNN may learn as a site shortcut.
_FONT_ROWS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# ### ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", "A": ".#. #.# ### #.# #.#", "C": "### #.. #.. #.. ###",
    "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..", "H": "#.# #.# ### #.# #.#",
    "K": "#.# ##. #.. ##. #.#", "L": "#.. #.. #.. #.. ###", "N": "### #.# #.# #.# #.#",
    "R": "##. #.# ##. #.# #.#", "T": "### .#. .#. .#. .#.", "Y": "#.# #.# .#. .#. .#.",
    "-": "... ... ### ... ...", ".": "... ... ... ... .#.", " ": "... ... ... ... ...",
}  # fmt: skip
FONT = {
    c: np.array([[ch == "#" for ch in row] for row in rows.split()])
    for c, rows in _FONT_ROWS.items()
}


@lru_cache(maxsize=256)
def _glyph(ch: str, k: int) -> np.ndarray:
    return np.kron(FONT.get(ch, FONT[" "]), np.ones((k, k), dtype=bool))


def _draw_text(canvas: np.ndarray, text: str, row: int, col: int, k: int) -> None:
    """Set the pixels of ``text`` (3x5 glyphs scaled by k) in a boolean canvas, clipped."""
    h, w = canvas.shape
    for i, ch in enumerate(text.upper()):
        glyph = _glyph(ch, k)
        c0 = col + i * 4 * k
        r1, c1 = min(h, row + 5 * k), min(w, c0 + 3 * k)
        if c0 < w and row < h:
            canvas[row:r1, c0:c1] |= glyph[: r1 - row, : c1 - c0]


def draw_overlay(images: np.ndarray, profile: SiteProfile, geo: dict[str, np.ndarray]) -> None:
    """Burn a caption, a depth scale (ticks every 0.5 cm), a frame number and a focus marker
    into uint8 images (B, H, W) in place."""
    size = images.shape[-1]
    k = max(1, round(size / 64))
    z0, z1 = (LINEAR_WINDOW if profile.probe == "linear" else SECTOR_WINDOW)[2:]
    fixed = np.zeros((size, size), dtype=bool)
    _draw_text(fixed, profile.overlay_text, k, k, k)
    for i, depth in enumerate(np.arange(0.0, z1 - 0.2, 0.5)):
        r = int((depth - z0) / (z1 - z0) * size)
        fixed[r : r + k, size - (3 if i % 2 == 0 else 2) * k - k : size - k] = True
    images[:, fixed] = profile.overlay_level
    for b in range(images.shape[0]):
        per_case = np.zeros((size, size), dtype=bool)
        _draw_text(per_case, f"{int(geo['frame'][b]):02d}", k, size - 9 * k, k)
        r = int((geo["focus_depth"][b] - z0) / (z1 - z0) * size)
        for j in range(k + 1):  # a small right-pointing triangle at the focal depth
            per_case[r - (k - j + 1) + 1 : r + (k - j + 1), j] = True
        images[b, per_case] = profile.overlay_level
