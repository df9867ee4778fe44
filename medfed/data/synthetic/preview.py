"""A picture of a federation: one row per site, a few negative and positive cases each.

Why: synthetic data is only useful if it looks like what it pretends to be, and the fastest check
of site effects (probe footprint, gain, grain, burned-in text, stain colour, blur) and of the
segmentation masks is to look. Grey-scale (C = 1) images are shown in grey, RGB (C = 3) ones in
colour; when the data has masks, their outlines are drawn on top.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medfed.data.site import ArrayDataset, Federation, Site  # noqa: E402


def _site_data(site: Site) -> ArrayDataset:
    parts = [d for d in (site.train, site.val, site.test) if d is not None and len(d)]
    return ArrayDataset.concat(parts)


def _pick(labels: np.ndarray, k: int) -> list[int]:
    """Alternate negative / positive examples (first ones of each class: deterministic)."""
    ben, mal = list(np.flatnonzero(labels == 0)), list(np.flatnonzero(labels == 1))
    out: list[int] = []
    while len(out) < k and (ben or mal):
        for pool in (ben, mal):
            if pool and len(out) < k:
                out.append(int(pool.pop(0)))
    return out


def write_preview(
    federation: Federation,
    path: str | Path,
    *,
    per_site: int = 8,
    outline_masks: bool = True,
    class_names: tuple[str, str] = ("B", "M"),
) -> Path:
    """Write a PNG grid: rows = sites (external last), columns = example images.

    Each tile is titled with its label (``class_names``: B / M for nodules, e.g. N / T for
    tumour tiles) and, with ``outline_masks``, shows its mask's contour thinly, so a reader can
    check at a glance that masks sit on the lesions.
    """
    sites = list(federation.sites) + ([federation.external] if federation.external else [])
    fig, axes = plt.subplots(
        len(sites), per_site, figsize=(1.35 * per_site, 1.5 * len(sites)), squeeze=False
    )
    for row, site in zip(axes, sites, strict=True):
        data = _site_data(site)
        labels = data.labels.numpy()
        for col, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            idx = _pick(labels, per_site)
            if col >= len(idx):
                continue
            i = idx[col]
            image = data.images[i].numpy()
            if image.shape[0] == 3:
                ax.imshow(image.transpose(1, 2, 0))
            else:
                ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
            if outline_masks and data.masks is not None and data.masks[i].any():
                ax.contour(data.masks[i].numpy(), levels=[0.5], colors="lime", linewidths=0.4)
            ax.set_title(class_names[1] if labels[i] == 1 else class_names[0], fontsize=7, pad=2,
                         color="firebrick" if labels[i] == 1 else "navy")  # fmt: skip
        probe = site.meta.get("probe", "")
        role = " (external)" if site is federation.external else ""
        row[0].set_ylabel(f"{site.name}{role}\n{probe}", fontsize=7)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
