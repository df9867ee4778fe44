"""Example overlays for a segmentation study: image | ground truth | federated | centralized.

A reader trusts a Dice table more after seeing what the masks look like. The figure is drawn where
the study runs (in simulation the validation images are at hand) and saved as a PNG beside
``results.json``; a deployed federation would draw it at each site for that site's eyes only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

COLUMNS = ("image", "ground truth", "federated", "centralized")


@dataclass(frozen=True)
class Example:
    site: str
    case_id: str
    image: np.ndarray  # uint8 (C, H, W)
    truth: np.ndarray  # uint8 (H, W)
    predicted: Mapping[str, np.ndarray]  # column title -> uint8 (H, W)


def pick_examples(masks: torch.Tensor, *, per_site: int) -> list[int]:
    """Indices of images worth showing: lesions of typical to large size, and one normal image.

    Quantiles of the foreground area rather than the largest lesions, so the figure shows the
    cases a reader meets, not only the easy ones.
    """
    if len(masks) == 0:
        return []
    area = masks.reshape(len(masks), -1).float().sum(dim=1).numpy()
    positive = np.flatnonzero(area > 0)
    chosen: list[int] = []
    if len(positive):
        order = positive[np.argsort(area[positive], kind="stable")]
        for q in np.linspace(0.9, 0.5, max(per_site - 1, 1)):
            i = int(order[min(int(q * len(order)), len(order) - 1)])
            if i not in chosen:
                chosen.append(i)
    negative = np.flatnonzero(area == 0)
    if len(negative) and len(chosen) < per_site:
        chosen.append(int(negative[0]))
    return chosen[:per_site]


def _rgb(image: np.ndarray) -> np.ndarray:
    img = image.transpose(1, 2, 0) if image.shape[0] in (1, 3) else image[..., None]
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def render(examples: Sequence[Example], *, title: str) -> bytes:
    """A PNG grid, one row per example; masks tinted over the image with their outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(examples), 1)
    fig, axes = plt.subplots(rows, len(COLUMNS), figsize=(2.2 * len(COLUMNS), 2.2 * rows + 0.4))
    axes = np.atleast_2d(axes)
    colours = {"ground truth": (0.1, 0.9, 0.2), "federated": (1.0, 0.3, 0.1)}
    for r, ex in enumerate(examples):
        base = _rgb(ex.image).astype(np.float64) / 255.0
        panels = {"image": None, "ground truth": ex.truth, **ex.predicted}
        for c, name in enumerate(COLUMNS):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            mask = panels.get(name)
            img = base.copy()
            if mask is not None:
                tint = np.array(colours.get(name, (0.2, 0.5, 1.0)))
                on = mask > 0
                img[on] = 0.55 * img[on] + 0.45 * tint
            ax.imshow(img, interpolation="nearest")
            if mask is not None and mask.any():
                ax.contour(mask > 0, levels=[0.5], colors=[colours.get(name, (0.2, 0.5, 1.0))],
                           linewidths=0.8)  # fmt: skip
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                # Case ids usually carry the site already; name it only when they do not.
                label = ex.case_id if ex.case_id.startswith(ex.site) else f"{ex.site}\n{ex.case_id}"
                ax.set_ylabel(label, fontsize=7)
    for ax in axes[len(examples) :].ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.2 * rows + 0.4)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_overlays(path: Path, examples: Sequence[Example], *, title: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render(examples, title=title))
    return path
