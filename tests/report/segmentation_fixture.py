"""A small but complete fake segmentation study directory, as ``medfed study`` would leave it.

Independent of ``medfed.study``: per-image confusion counts are random, and every number in
results.json is computed from them with plain numpy (Wilcoxon from scipy), so what the report
shows can be checked against the counts. No ``predictions.csv``: a segmentation study writes
``segmentation.csv`` instead, which the report does not read.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import stats as sps

SITES = ("site1", "site2", "site3")
NETWORKS = ("UNet", "TinyUNet")
ROUNDS = 3
POOLED_TRAIN = 240
PIXELS = 32 * 32
SEG_METRICS = ("dice", "jaccard", "pixel_acc", "mean_image_dice")
SKILL = {"centralized": 0.85, "federated": 0.8}
LOCAL_SKILL = 0.6


def slug(network: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in network.lower())


def _counts(truth: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    """(n, 4) TP, FP, FN, TN per image: ``skill`` of the foreground found, some false alarms."""
    tp = np.round(truth * np.clip(skill + rng.normal(0, 0.08, len(truth)), 0.05, 1.0))
    fp = np.round(truth * (1 - skill) * rng.random(len(truth)))
    fn = truth - tp
    tn = PIXELS - tp - fp - fn
    return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)


def _pooled(c: np.ndarray) -> dict[str, float]:
    tp, fp, fn, tn = c.sum(axis=0).astype(float)
    return {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "jaccard": tp / (tp + fp + fn),
        "pixel_acc": (tp + tn) / (tp + fp + fn + tn),
    }


def image_dice(c: np.ndarray) -> np.ndarray:
    tp, fp, fn = c[:, 0].astype(float), c[:, 1].astype(float), c[:, 2].astype(float)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 1.0)


def _point(c: np.ndarray, hd95: np.ndarray | None) -> dict[str, float]:
    out = _pooled(c) | {"mean_image_dice": float(image_dice(c).mean())}
    if hd95 is not None:
        out["hd95"] = float(hd95.mean())
    return out


def _metrics(c: np.ndarray, hd95: np.ndarray | None, rng: np.random.Generator) -> dict[str, Any]:
    point = _point(c, hd95)
    boots = []
    for _ in range(30):
        idx = rng.integers(0, len(c), len(c))
        boots.append(_point(c[idx], None if hd95 is None else hd95[idx]))
    out: dict[str, Any] = {"n": len(c), "n_pixels": len(c) * PIXELS}
    for name, value in point.items():
        vals = np.array([b[name] for b in boots])
        out[name] = round(value, 6)
        out[f"{name}_ci"] = [round(float(np.quantile(vals, q)), 6) for q in (0.025, 0.975)]
    return out


def _history(rng: np.random.Generator, sites: tuple[str, ...], external: bool) -> str:
    lines = []
    for r in range(ROUNDS):
        dice = 0.55 + 0.1 * r + 0.02 * rng.random()
        scores = {
            "dice": dice,
            "jaccard": dice / (2 - dice),
            "pixel_acc": 0.95,
            "mean_image_dice": dice - 0.02,
        }
        lines.append(
            json.dumps(
                {
                    "round": r,
                    "participants": list(sites),
                    "sites": {
                        s: {"train_loss": 0.6 - 0.1 * r, "examples": 80, "steps": 4} for s in sites
                    },
                    "val": scores,
                    "external": {k: v - 0.05 for k, v in scores.items()} if external else None,
                    "site_val": {
                        s: {"dice": dice, "jaccard": 0.5, "pixel_acc": 0.95, "n": 10} for s in sites
                    },
                    "val_auc": None,
                    "external_auc": None,
                    "rejected": {},
                    "bytes_up": 1000,
                    "bytes_down": 2000,
                    "seconds": 0.5,
                }
            )
        )
    return "\n".join(lines) + "\n"


def write_overlay(path: Path, seed: int = 0) -> None:
    """A real PNG: 2 example rows × 4 columns (image | truth | federated | centralized)."""
    rng = np.random.default_rng(seed)
    tiles = (rng.random((2, 4, 12, 12, 3)) * 255).astype(np.uint8)
    grid = tiles.transpose(0, 2, 1, 3, 4).reshape(24, 48, 3).repeat(8, axis=0).repeat(8, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, "RGB").save(path, format="PNG")


def make_segmentation_study(
    directory: Path,
    *,
    networks: tuple[str, ...] = NETWORKS,
    sites: tuple[str, ...] = SITES,
    external: bool = True,
    hd95: bool = False,
    seed: int = 0,
) -> Path:
    """Write results.json, segmentation.csv, histories and overlays into ``directory``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paradigms = ("centralized", "federated", *(f"local:{s}" for s in sites))
    images: list[tuple[str, str, str]] = [
        ("internal", site, f"{site}-{i:03d}")
        for k, site in enumerate(sites)
        for i in range(8 + 2 * k)
    ]
    if external:
        images += [("external", "site7", f"ext-{i:03d}") for i in range(10)]
    truth = rng.integers(40, 300, len(images)).astype(float)
    split_of = np.array([c[0] for c in images])
    site_of = np.array([c[1] for c in images])
    splits = ("internal", "external") if external else ("internal",)

    doc: dict[str, Any] = {}
    rows: list[list[Any]] = []
    comparisons: list[dict[str, Any]] = []
    timing: dict[str, Any] = {}
    histories: dict[str, dict[str, str]] = {}
    for n_idx, net in enumerate(networks):
        doc[net], timing[net], histories[net] = {}, {}, {}
        counts: dict[str, np.ndarray] = {}
        for p in paradigms:
            c = _counts(truth, SKILL.get(p, LOCAL_SKILL) - 0.1 * n_idx, rng)
            counts[p] = c
            dist = rng.uniform(1, 12, len(images)) if hd95 else None
            by_split = {}
            for split in splits:
                mask = split_of == split
                by_split[split] = _metrics(c[mask], None if dist is None else dist[mask], rng)
            for site in sites:
                mask = (split_of == "internal") & (site_of == site)
                by_split[f"site:{site}"] = _metrics(
                    c[mask], None if dist is None else dist[mask], rng
                )
            doc[net][p] = by_split
            rows += [
                [net, p, img[0], img[1], img[2], *map(int, cc), repr(float(d))]
                for img, cc, d in zip(images, c, image_dice(c), strict=True)
            ]
            secs = 2.0 + rng.random()
            timing[net][p] = {
                "seconds": round(secs, 3),
                "train_images": POOLED_TRAIN * ROUNDS,
                "images_per_s": round(POOLED_TRAIN * ROUNDS / secs, 1),
            }
            rel = f"runs/{slug(net)}/{p.replace(':', '/')}/history.jsonl"
            histories[net][p] = rel
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_text(_history(rng, sites, external))
        for split in splits:
            mask = split_of == split
            dice_a = image_dice(counts["federated"][mask])
            for b in (p for p in paradigms if p != "federated"):
                dice_b = image_dice(counts[b][mask])
                res = sps.wilcoxon(dice_a, dice_b)
                comparisons.append(
                    {
                        "network": net,
                        "split": split,
                        "a": "federated",
                        "b": b,
                        "metric": "image_dice",
                        "test": "wilcoxon",
                        "n": int(mask.sum()),
                        "mean_a": float(dice_a.mean()),
                        "mean_b": float(dice_b.mean()),
                        "difference": float(dice_a.mean() - dice_b.mean()),
                        "statistic": float(res.statistic),
                        "p_value": None if math.isnan(res.pvalue) else float(res.pvalue),
                    }
                )
    overlays = {net: f"overlays/{slug(net)}.png" for net in networks}
    for i, rel in enumerate(overlays.values()):
        write_overlay(directory / rel, seed=i)
    doc.update(
        config_hash="5e9c0ffee123",
        comparisons=comparisons,
        timing=timing,
        meta={
            "name": "seg-study-test",
            "created": "2026-11-22T10:00:00+00:00",
            "medfed_version": "0.1.0",
            "device": "cpu",
            "strategy": "fedavg",
            "task": "segmentation",
            "metrics": ["dice", "jaccard", "pixel_acc"],
            "networks": list(networks),
            "models": {n: f"medfed:{slug(n)}" for n in networks},
            "paradigms": list(paradigms),
            "sites": list(sites),
            "external_site": "site7" if external else None,
            "budget": {"pooled_epochs": ROUNDS, "rounds": ROUNDS, "train_images": POOLED_TRAIN},
            "bootstrap": {"n_resamples": 30, "level": 0.95, "seed": 0},
            "communication": {
                n: {
                    "rounds": ROUNDS,
                    "bytes_up": 1_500_000,
                    "bytes_down": 3_000_000,
                    "bytes_per_round": 1_500_000.0,
                }
                for n in networks
            },
            "histories": histories,
            "overlays": overlays,
            "wall_seconds": 12.5,
        },
    )
    (directory / "results.json").write_text(json.dumps(doc, indent=1))
    with (directory / "segmentation.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["network", "paradigm", "split", "site", "case_id", "tp", "fp", "fn", "tn", "dice"]
        )
        w.writerows(rows)
    return directory
