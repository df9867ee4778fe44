"""Figures as PNG bytes, ready to inline as data URIs.

Built on ``matplotlib.figure.Figure`` with the Agg canvas rather than ``pyplot``: no global
backend switch (importing the report from a notebook must not break its plots) and no figure
registry to leak when a report is generated inside a long-running process.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from medfed.report.load import (
    CENTRALIZED,
    DECENTRAL,
    EXTERNAL,
    FEDERATED,
    LOCAL_PREFIX,
    Curve,
    RoundPoint,
    Study,
)
from medfed.report.tables import site_splits
from medfed.report.text import (
    METRIC_LABELS,
    fmt_score,
    handed_over_label,
    paradigm_label,
    split_label,
)

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
CENTRAL_COLOR = "#0072B2"
FEDERATED_COLOR = "#D55E00"
LOCAL_COLOR = "#009E73"
LOCAL_PALETTE = ("#56B4E9", "#E69F00", "#009E73", "#CC79A7", "#999999", "#8C564B", "#BCBD22")
# Peer-to-peer and one-shot models (cyclic, gossip, one_shot): dashed, so they read as the
# alternatives to the two solid server-side curves.
DECENTRAL_COLORS = dict(zip(DECENTRAL, ("#CC79A7", "#009E73", "#000000"), strict=True))
DPI = 110
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "text.parse_math": False,  # a "$" in a site name must print, not start mathtext
}


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@contextmanager
def _figure(width: float, height: float) -> Iterator[tuple[Figure, io.BytesIO]]:
    buf = io.BytesIO()
    with mpl.rc_context(cast(Any, STYLE)):  # matplotlib types rc keys as a Literal union
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        yield fig, buf
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, TPR) at every distinct threshold; ``None`` when one class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)  # a diverged model's NaN scores cannot be ranked
    y, s = np.asarray(labels).astype(bool)[finite], s[finite]
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def _roc_axes(ax: Axes, study: Study, network: str, split: str) -> None:
    locals_ = study.meta.locals
    lines: dict[str, Line2D] = {}
    (lines["chance"],) = ax.plot([0, 1], [0, 1], color="#BBBBBB", lw=0.8, ls="--", label="Chance")
    # Drawn locals first so federated ends on top; listed federated first in the legend.
    for i, p in enumerate((*locals_, *DECENTRAL, CENTRALIZED, FEDERATED)):
        if not study.has(p):
            continue
        curve: Curve | None = study.predictions.get((network, p, split))
        pts = roc_points(curve.labels, curve.scores) if curve is not None else None
        if pts is None:
            continue
        m = study.metrics(network, p, split)
        label = f"{paradigm_label(p)} (AUC {fmt_score(m.value('auc'))})"
        if p.startswith(LOCAL_PREFIX):
            color = LOCAL_PALETTE[i % len(LOCAL_PALETTE)]
            (lines[p],) = ax.plot(*pts, color=color, lw=0.9, alpha=0.6, label=label)
        elif p in DECENTRAL_COLORS:
            (lines[p],) = ax.plot(*pts, color=DECENTRAL_COLORS[p], lw=1.4, ls="--", label=label)
        else:
            color = FEDERATED_COLOR if p == FEDERATED else CENTRAL_COLOR
            (lines[p],) = ax.plot(*pts, color=color, lw=2.0, label=label, zorder=3)
            sens, spec = m.value("sensitivity"), m.value("specificity")
            if sens is not None and spec is not None:
                ax.plot(1 - spec, sens, "o", color=color, ms=5, zorder=4, mec="white")
    if len(lines) == 1:
        ax.text(0.5, 0.5, "no predictions recorded", ha="center", va="center", color="#666666")
    title = split_label(split)
    if split == EXTERNAL and study.meta.external_site:
        title += f" ({study.meta.external_site})"
    ax.set_title(title)
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("Sensitivity (true-positive rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.25)
    order = [k for k in (FEDERATED, CENTRALIZED, *DECENTRAL, *locals_, "chance") if k in lines]
    ax.legend(handles=[lines[k] for k in order], loc="lower right", fontsize=7)


def roc_figure(study: Study, network: str) -> bytes:
    """Internal and external ROC side by side; dots mark each model's operating threshold."""
    splits = study.meta.splits
    with _figure(4.6 * len(splits), 4.8) as (fig, buf):
        for ax, split in zip(fig.subplots(1, len(splits), squeeze=False)[0], splits, strict=True):
            _roc_axes(ax, study, network, split)
    return buf.getvalue()


def _series(
    points: tuple[RoundPoint, ...], split: str, metric: str = ""
) -> tuple[list[int], list[float]]:
    """Per round, ``metric`` on ``split`` ("val", "external"), or the train loss (``"loss"``)."""
    xs, ys = [], []
    for pt in points:
        v = pt.train_loss if split == "loss" else pt.score(split, metric)
        xs.append(pt.round + 1)
        ys.append(math.nan if v is None else v)
    return xs, ys


def learning_figure(study: Study, network: str) -> bytes | None:
    """Federated AUC (Dice) and train loss per round, centralized (same budget per round) for
    reference.

    ``None`` when neither run recorded a history, so the caller can say so instead of showing
    empty axes that look like a failed model.
    """
    metric = study.headline
    label = METRIC_LABELS[metric]
    hist = study.histories.get(network, {})
    runs = [(p, hist.get(p)) for p in (FEDERATED, CENTRALIZED)]
    runs_with = [(p, pts) for p, pts in runs if pts]
    if not runs_with:
        return None
    with _figure(9.2, 3.6) as (fig, buf):
        ax_auc, ax_loss = fig.subplots(1, 2)
        for p, pts in runs_with:
            assert pts is not None
            color = FEDERATED_COLOR if p == FEDERATED else CENTRAL_COLOR
            name = paradigm_label(p)
            ax_auc.plot(
                *_series(pts, "val", metric), "-o", color=color, ms=3, label=f"{name}, internal"
            )
            if any(pt.score("external", metric) is not None for pt in pts):
                ext = _series(pts, "external", metric)
                ax_auc.plot(*ext, "--s", color=color, ms=3, alpha=0.8, label=f"{name}, external")
            if any(pt.train_loss is not None for pt in pts):
                ax_loss.plot(*_series(pts, "loss"), "-o", color=color, ms=3, label=name)
        ax_auc.set_title(f"Validation {label}")
        # Chance (AUC) or nothing (Dice) to perfect, widened only if a run starts below chance:
        # autoscaling would magnify a 0.001 wiggle near 1.0 into a dramatic-looking curve.
        scores = [
            pt.score(split, metric)
            for _, pts in runs_with
            for pt in pts or ()
            for split in ("val", "external")
        ]
        low = min([0.5 if metric == "auc" else 0.0, *(v for v in scores if v is not None)])
        ax_auc.set_ylim(math.floor(low * 20) / 20, 1.01)
        ax_auc.set_xlabel("Round")
        ax_auc.set_ylabel(label)
        ax_loss.set_title("Mean training loss (example-weighted over sites)")
        ax_loss.set_xlabel("Round")
        ax_loss.set_ylabel("Loss")
        for ax in (ax_auc, ax_loss):
            ax.grid(alpha=0.25)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.has_data():
                ax.legend(fontsize=7)
        missing = [paradigm_label(p) for p, pts in runs if not pts]
        if missing:
            fig.suptitle(f"No history recorded for: {', '.join(missing)}", fontsize=8, color="#666")
    return buf.getvalue()


def site_figure(study: Study, network: str) -> bytes:
    """Per site, one bar per model: centralized, federated, the peer-to-peer and one-shot models
    (hatched) the study has, and that site's own local model; with those, the external site too.
    """
    metric = study.headline
    rows = site_splits(study)
    bars: tuple[tuple[str | None, str, str], ...] = (
        (CENTRALIZED, CENTRAL_COLOR, "Centralized"),
        (FEDERATED, FEDERATED_COLOR, "Federated"),
        *((p, DECENTRAL_COLORS[p], handed_over_label(p)) for p in DECENTRAL if study.has(p)),
        (None, LOCAL_COLOR, "Local (own site)"),
    )
    n = len(bars)
    width = 0.26 if n <= 3 else 0.8 / n
    x = np.arange(len(rows))
    with _figure(max(4.4, max(0.9, 0.25 * n) * len(rows) + 1.6), 3.4) as (fig, buf):
        ax = fig.subplots()
        for k, (paradigm, color, label) in enumerate(bars):
            vals, err_lo, err_hi = [], [], []
            for _, split, own in rows:
                p = paradigm or own
                m = None
                if p is not None and p in study.meta.paradigms:
                    m = study.metrics(network, p, split)
                v = m.value(metric) if m is not None else None
                ci = m.ci(metric) if m is not None else None
                v_num = math.nan if v is None else v
                lo = ci[0] if ci is not None and ci[0] is not None else v_num
                hi = ci[1] if ci is not None and ci[1] is not None else v_num
                vals.append(v_num)
                err_lo.append(max(v_num - lo, 0.0) if not math.isnan(v_num) else 0.0)
                err_hi.append(max(hi - v_num, 0.0) if not math.isnan(v_num) else 0.0)
            # hatched: the one model a paradigm without a server hands over, told apart from
            # the solid local bars even where the two share a colour (None: matplotlib's default)
            hatched = paradigm in DECENTRAL
            ax.bar(
                x + (k - (n - 1) / 2) * width,
                vals,
                width,
                yerr=[err_lo, err_hi],
                color=color,
                label=label,
                error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"},
                hatch="///" if hatched else None,
                edgecolor="white" if hatched else None,
                linewidth=0 if hatched else None,
            )
        if metric == "auc":
            ax.axhline(0.5, color="#999999", lw=0.8, ls="--")
        ax.set_xticks(x, [name for name, _, _ in rows])
        where = "the site's own" if len(rows) == len(study.meta.sites) else "each"
        ax.set_ylabel(f"{METRIC_LABELS[metric]} on {where} validation split")
        ax.set_ylim(0.0, 1.05)  # bars start at zero: a truncated axis inflates the gaps
        ax.grid(axis="y", alpha=0.25)
        ax.legend(fontsize=7, ncols=n, loc="upper center", bbox_to_anchor=(0.5, 1.12))
    return buf.getvalue()


def epsilon_figure(study: Study, network: str) -> bytes | None:
    """ε spent after each round by every DP run of ``network``, with its budget dashed.

    Shows where the budget went: DP-SGD spends a little every local step, client-level DP the
    same amount every round. ``None`` when no run recorded a per-round ε.
    """
    info = study.privacy.of(network)
    hist = study.histories.get(network, {})
    if info is None:
        return None
    runs = [(p, pts) for p in study.meta.paradigms if (pts := hist.get(p)) and _has_epsilon(pts)]
    if not runs:
        return None
    with _figure(4.8, 3.2) as (fig, buf):
        ax = fig.subplots()
        for i, (p, pts) in enumerate(runs):
            xs = [pt.round + 1 for pt in pts]
            ys = [math.nan if pt.epsilon is None else pt.epsilon for pt in pts]
            if p.startswith(LOCAL_PREFIX):
                color = LOCAL_PALETTE[i % len(LOCAL_PALETTE)]
                ax.plot(xs, ys, "-", color=color, lw=0.9, alpha=0.7, label=paradigm_label(p))
            else:
                color = FEDERATED_COLOR if p == FEDERATED else CENTRAL_COLOR
                ax.plot(xs, ys, "-o", color=color, ms=3, label=paradigm_label(p))
        if info.budget is not None:
            ax.axhline(info.budget, color="#999999", lw=0.8, ls="--", label="Budget")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("Round")
        ax.set_ylabel("ε (most-exposed site)")
        ax.grid(alpha=0.25)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return buf.getvalue()


def _has_epsilon(points: tuple[RoundPoint, ...]) -> bool:
    return any(pt.epsilon is not None for pt in points)
