"""A small but complete fake study directory, as ``medfed study`` would leave it.

Independent of ``medfed.study``: the scores are random, but every number in results.json is
computed from predictions.csv with plain numpy, so the report's figures and tables must agree.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SITES = ("site1", "site2", "site3")
NETWORKS = ("SmallCNN", "TinyCNN")
ROUNDS = 3
POOLED_TRAIN = 480
METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
# How well each paradigm separates the classes: locals worse than pooled training, as in life.
SKILL = {"centralized": 1.0, "federated": 0.9}
LOCAL_SKILL = 0.45

StudyFactory = Callable[..., Path]


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return math.nan
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return float(psi.mean())


def _point(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    pred = s >= threshold
    tp = float(np.sum(pred & (y == 1)))
    tn = float(np.sum(~pred & (y == 0)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    sens, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
    return {
        "auc": _auc(y, s),
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * ppv * sens, ppv + sens) if not math.isnan(ppv + sens) else math.nan,
    }


def _youden(y: np.ndarray, s: np.ndarray) -> float:
    best, best_t = -1.0, 0.5
    for t in np.unique(s):
        p = _point(y, s, float(t))
        j = p["sensitivity"] + p["specificity"] - 1
        if j > best:
            best, best_t = j, float(t)
    return best_t


def _json_num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def _metrics(y: np.ndarray, s: np.ndarray, threshold: float, rng: np.random.Generator) -> dict:
    point = _point(y, s, threshold)
    boots = []
    for _ in range(30):
        idx = rng.integers(0, len(y), len(y))
        boots.append(_point(y[idx], s[idx], threshold))
    out: dict[str, Any] = {}
    for m in METRIC_NAMES:
        vals = np.array([b[m] for b in boots])
        vals = vals[~np.isnan(vals)]
        out[m] = _json_num(point[m])
        ci = (
            [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]
            if len(vals)
            else None
        )
        out[f"{m}_ci"] = [_json_num(c) for c in ci] if ci else None
    out.update(threshold=round(threshold, 6), n=int(len(y)), n_pos=int(y.sum()))
    return out


def _delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sided DeLong test for two correlated AUCs on the same cases: (z, p)."""
    pos, neg = y == 1, y == 0
    v10, v01 = [], []
    for s in (a, b):
        x, z = s[pos], s[neg]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    var = s10 / pos.sum() + s01 / neg.sum()
    diff = float(np.mean(v10[0]) - np.mean(v10[1]))
    se = math.sqrt(max(var[0, 0] + var[1, 1] - 2 * var[0, 1], 1e-12))
    zval = diff / se
    return zval, math.erfc(abs(zval) / math.sqrt(2))


def _history(rng: np.random.Generator, sites: tuple[str, ...], external: bool) -> str:
    lines = []
    for r in range(ROUNDS):
        auc = 0.6 + 0.08 * r + 0.02 * rng.random()
        lines.append(
            json.dumps(
                {
                    "round": r,
                    "participants": list(sites),
                    "sites": {
                        s: {
                            "train_loss": 0.7 - 0.1 * r + 0.05 * rng.random(),
                            "examples": 100 + 10 * i,
                            "steps": 4,
                        }
                        for i, s in enumerate(sites)
                    },
                    "val_auc": auc,
                    "val_acc": auc - 0.05,
                    "site_val": {s: {"auc": auc, "acc": auc - 0.05, "n": 30.0} for s in sites},
                    "rejected": {},
                    "bytes_up": 1000,
                    "bytes_down": 2000,
                    "seconds": 0.5,
                    "external_auc": auc - 0.03 if external else None,
                    "external_acc": auc - 0.08 if external else None,
                }
            )
        )
    return "\n".join(lines) + "\n"


def make_study(
    directory: Path,
    *,
    networks: tuple[str, ...] = NETWORKS,
    sites: tuple[str, ...] = SITES,
    external: bool = True,
    seed: int = 0,
) -> Path:
    """Write results.json, predictions.csv and histories into ``directory``; return it."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paradigms = ("centralized", "federated", *(f"local:{s}" for s in sites))
    # The cases: a few dozen per site plus an external site; identical for every model.
    cases: list[tuple[str, str, str, int]] = []
    for k, site in enumerate(sites):
        for i in range(30 + 6 * k):
            cases.append(("internal", site, f"{site}-{i:03d}", int(rng.random() < 0.6)))
    if external:
        cases += [("external", "site7", f"ext-{i:03d}", int(rng.random() < 0.5)) for i in range(40)]
    labels = np.array([c[3] for c in cases])
    split_of = np.array([c[0] for c in cases])
    site_of = np.array([c[1] for c in cases])

    results: dict[str, Any] = {}
    rows: list[list[Any]] = []
    scores: dict[tuple[str, str], np.ndarray] = {}
    comparisons = []
    timing: dict[str, Any] = {}
    histories: dict[str, dict[str, str]] = {}
    for n_idx, net in enumerate(networks):
        results[net], timing[net], histories[net] = {}, {}, {}
        for p in paradigms:
            skill = SKILL.get(p, LOCAL_SKILL) - 0.2 * n_idx
            logit = skill * (2 * labels - 1) + rng.normal(0, 1.1, len(labels))
            s = np.round(1 / (1 + np.exp(-logit)), 4)
            scores[net, p] = s
            rows += [
                [net, p, c[0], c[1], c[2], c[3], f"{v:.4f}"] for c, v in zip(cases, s, strict=True)
            ]
            internal = split_of == "internal"
            thr = _youden(labels[internal], s[internal])
            by_split = {"internal": _metrics(labels[internal], s[internal], thr, rng)}
            if external:
                ext = split_of == "external"
                by_split["external"] = _metrics(labels[ext], s[ext], thr, rng)
            for site in sites:
                here = internal & (site_of == site)
                by_split[f"site:{site}"] = _metrics(labels[here], s[here], thr, rng)
            results[net][p] = by_split
            images = POOLED_TRAIN * ROUNDS
            secs = 2.0 + rng.random()
            timing[net][p] = {
                "seconds": round(secs, 3),
                "train_images": images,
                "images_per_s": round(images / secs, 1),
            }
            slug = p.replace(":", "/")
            rel = f"runs/net{n_idx}/{slug}/history.jsonl"
            histories[net][p] = rel
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_text(_history(rng, sites, external))
        for split in ("internal", "external") if external else ("internal",):
            mask = split_of == split
            for b in paradigms[:1] + paradigms[2:]:
                z, pval = _delong(
                    labels[mask], scores[net, "federated"][mask], scores[net, b][mask]
                )
                a_auc = _auc(labels[mask], scores[net, "federated"][mask])
                b_auc = _auc(labels[mask], scores[net, b][mask])
                comparisons.append(
                    {
                        "network": net,
                        "split": split,
                        "a": "federated",
                        "b": b,
                        "auc_a": a_auc,
                        "auc_b": b_auc,
                        "difference": a_auc - b_auc,
                        "z": z,
                        "p_value": pval,
                    }
                )
    results.update(
        config_hash="ab12cd34ef56",
        comparisons=comparisons,
        timing=timing,
        meta={
            "name": "study-test",
            "created": "2026-11-22T10:00:00+00:00",
            "medfed_version": "0.1.0",
            "device": "cpu",
            "strategy": "fedavg",
            "networks": list(networks),
            "models": {n: f"medfed:{n.lower()}" for n in networks},
            "paradigms": list(paradigms),
            "sites": list(sites),
            "external_site": "site7" if external else None,
            "budget": {"pooled_epochs": ROUNDS, "rounds": ROUNDS, "train_images": POOLED_TRAIN},
            "threshold_rule": "Youden's J on the pooled internal validation split, applied "
            "unchanged to every other split",
            "bootstrap": {"n_resamples": 30, "level": 0.95, "seed": 0},
            "communication": {
                n: {
                    "rounds": ROUNDS,
                    "bytes_up": 3_500_000,
                    "bytes_down": 7_000_000,
                    "bytes_per_round": 3_500_000.0,
                }
                for n in networks
            },
            "histories": histories,
        },
    )
    (directory / "results.json").write_text(json.dumps(results, indent=1))
    with (directory / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["network", "paradigm", "split", "site", "case_id", "label", "score"])
        w.writerows(rows)
    return directory


def edit_results(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to results.json in place (to build the edge cases a real study rarely has)."""
    path = directory / "results.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def study_factory(tmp_path: Path) -> StudyFactory:
    counter = iter(range(1000))

    def build(**options: Any) -> Path:
        return make_study(tmp_path / f"study{next(counter)}", **options)

    return build


@pytest.fixture(scope="session")
def written_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One default study with its report, shared by the tests that only read it."""
    from medfed.report import write_report

    directory = make_study(tmp_path_factory.mktemp("report") / "study")
    html_path, md_path = write_report(directory)
    return directory, html_path, md_path


@pytest.fixture
def edit() -> Callable[[Path, Callable[[dict[str, Any]], None]], None]:
    return edit_results


@pytest.fixture
def seg_study_factory(tmp_path: Path) -> StudyFactory:
    """Fake segmentation studies (see ``segmentation_fixture``), one directory per call."""
    from tests.report.segmentation_fixture import make_segmentation_study

    counter = iter(range(1000))

    def build(**options: Any) -> Path:
        return make_segmentation_study(tmp_path / f"seg{next(counter)}", **options)

    return build


@pytest.fixture(scope="session")
def seg_written_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One default segmentation study with its report, shared by the tests that only read it."""
    from medfed.report import write_report
    from tests.report.segmentation_fixture import make_segmentation_study

    directory = make_segmentation_study(tmp_path_factory.mktemp("seg-report") / "study")
    html_path, md_path = write_report(directory)
    return directory, html_path, md_path
