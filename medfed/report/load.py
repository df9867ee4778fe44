"""Read a study directory into typed, validated values.

The study writer and the report are written separately; a schema drift should fail here, loudly
and naming the file and the field, rather than as a blank cell or a ``KeyError`` deep in a figure.
Histories and segmentation overlays are the soft inputs: a run that recorded none still deserves
a report.

Two kinds of study share one layout (``meta.task``, missing in older files = classification):
classification (AUC with DeLong CIs, operating-point metrics, ``predictions.csv``) and
segmentation (pooled Dice/Jaccard/pixel accuracy with bootstrap CIs over images, Wilcoxon tests on
per-image Dice, example overlays; no ``predictions.csv``).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.metrics.binary import Metric
from medfed.report.decentral import Decentral, read_decentral
from medfed.report.fields import CI as CI
from medfed.report.fields import RESULTS as RESULTS
from medfed.report.fields import count, fail, get, interval, num, text, texts
from medfed.report.privacy import StudyPrivacy, read_privacy
from medfed.report.rounds import RoundPoint as RoundPoint
from medfed.report.rounds import read_history
from medfed.study.config import DECENTRAL_PARADIGMS

# The study writer owns the schema's names; the report reads them from there.
from medfed.study.stats import LOCAL_PREFIX as LOCAL_PREFIX
from medfed.study.stats import SITE_PREFIX as SITE_PREFIX
from medfed.study.stats import Split
from medfed.types import Paradigm

PREDICTIONS = "predictions.csv"

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
TASKS = (CLASSIFICATION, SEGMENTATION)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

METRICS = ("auc", *(str(m) for m in Metric))
SEG_METRICS = ("dice", "jaccard", "pixel_acc", "mean_image_dice")
SEG_OPTIONAL = ("hd95",)
"""Written only by studies that compute it; a missing key reads as undefined, not as an error."""
INTERNAL = str(Split.INTERNAL)
EXTERNAL = str(Split.EXTERNAL)
CENTRALIZED = str(Paradigm.CENTRALIZED)
FEDERATED = str(Paradigm.FEDERATED)
DECENTRAL = tuple(str(p) for p in DECENTRAL_PARADIGMS)
"""Cyclic, gossip, one-shot: paradigms without a training server (see ``Study.decentral``)."""


@dataclass(frozen=True)
class SplitMetrics:
    """One model on one evaluation split; ``None`` where a metric is undefined (no positives...)."""

    values: Mapping[str, float | None]
    cis: Mapping[str, CI | None]
    threshold: float | None
    n: int
    """Cases (classification) or images (segmentation)."""
    n_pos: int | None
    """Malignant cases; ``None`` for segmentation."""
    n_pixels: int | None = None
    """Pixels scored (segmentation only)."""

    def value(self, metric: str) -> float | None:
        return self.values.get(metric)

    def ci(self, metric: str) -> CI | None:
        return self.cis.get(metric)


EMPTY = SplitMetrics(values={}, cis={}, threshold=None, n=0, n_pos=0)
"""A split with no cases (a site without validation data): every metric undefined."""


@dataclass(frozen=True)
class Comparison:
    """A paired test of model ``a`` against ``b`` on the same cases of one split.

    Classification: DeLong on AUC (``value_a``/``value_b`` are the AUCs, ``statistic`` is z).
    Segmentation: Wilcoxon signed-rank on per-image Dice (``value_a``/``value_b`` are the mean
    per-image Dice of each model over the ``n`` images).
    """

    network: str
    split: str
    a: str
    b: str
    value_a: float | None
    value_b: float | None
    difference: float | None
    statistic: float | None
    p_value: float | None
    metric: str = "auc"
    test: str = "delong"
    n: int | None = None

    @property
    def auc_a(self) -> float | None:
        return self.value_a

    @property
    def auc_b(self) -> float | None:
        return self.value_b

    @property
    def z(self) -> float | None:
        return self.statistic


@dataclass(frozen=True)
class Timing:
    seconds: float | None
    train_images: int | None
    images_per_s: float | None


@dataclass(frozen=True)
class Communication:
    rounds: int
    bytes_up: int
    bytes_down: int
    bytes_per_round: float | None


@dataclass(frozen=True)
class Pretrain:
    """The study's warm start on public data (``pretrain:``): per model, images and validation."""

    source: str
    epochs: int
    train_images: Mapping[str, int]
    val: Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class Budget:
    pooled_epochs: float
    rounds: int
    train_images: int
    pretrain: Pretrain | None = None


@dataclass(frozen=True)
class Bootstrap:
    n_resamples: int
    level: float
    seed: int


@dataclass(frozen=True)
class Meta:
    name: str
    created: str
    medfed_version: str
    device: str
    strategy: str
    networks: tuple[str, ...]
    models: Mapping[str, str]
    paradigms: tuple[str, ...]
    sites: tuple[str, ...]
    external_site: str | None
    budget: Budget
    threshold_rule: str | None
    """Classification only: how the operating threshold was chosen."""
    bootstrap: Bootstrap
    communication: Mapping[str, Communication]
    histories: Mapping[str, Mapping[str, str]]
    task: str = CLASSIFICATION
    metrics: tuple[str, ...] = METRICS
    overlays: Mapping[str, str] = field(default_factory=dict)
    """Segmentation only: network -> PNG of example overlays, relative to the study directory."""

    @property
    def segmentation(self) -> bool:
        return self.task == SEGMENTATION

    @property
    def splits(self) -> tuple[str, ...]:
        """Pooled splits in display order: external only when the study held a site out."""
        return (INTERNAL, EXTERNAL) if self.external_site is not None else (INTERNAL,)

    @property
    def locals(self) -> tuple[str, ...]:
        return tuple(p for p in self.paradigms if p.startswith(LOCAL_PREFIX))


@dataclass(frozen=True)
class Curve:
    """Scores of one model on one split, kept as arrays so ROC curves need no re-reading."""

    labels: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class Overlay:
    """A segmentation study's example-overlay image for one network, if it could be read."""

    path: str | None
    """As recorded in ``meta.overlays`` (relative to the study directory); ``None``: not recorded."""
    png: bytes | None
    problem: str = ""
    """Why ``png`` is ``None``, in words for the placeholder that stands in for the image."""


@dataclass(frozen=True)
class Study:
    directory: Path
    config_hash: str
    meta: Meta
    results: Mapping[str, Mapping[str, Mapping[str, SplitMetrics]]]
    comparisons: tuple[Comparison, ...]
    timing: Mapping[str, Mapping[str, Timing]]
    predictions: Mapping[tuple[str, str, str], Curve]
    """Classification only; empty for a segmentation study."""
    histories: Mapping[str, Mapping[str, tuple[RoundPoint, ...] | None]]
    overlays: Mapping[str, Overlay] = field(default_factory=dict)
    privacy: StudyPrivacy = field(default_factory=StudyPrivacy)
    """ε spent per run and the cost of DP against each DP network's twin; empty without DP."""
    decentral: Decentral = field(default_factory=Decentral)
    """Peer-to-peer site models and the one-shot comparison; empty without those paradigms."""

    @property
    def segmentation(self) -> bool:
        return self.meta.segmentation

    @property
    def headline(self) -> str:
        """The metric the study is judged by: pooled Dice for segmentation, AUC otherwise."""
        return "dice" if self.segmentation else "auc"

    def metrics(self, network: str, paradigm: str, split: str) -> SplitMetrics:
        """Never raises: a model or split the study did not produce reads as all-undefined."""
        return self.results.get(network, {}).get(paradigm, {}).get(split, EMPTY)

    def has(self, paradigm: str) -> bool:
        return paradigm in self.meta.paradigms

    def comparison(self, network: str, split: str, a: str, b: str) -> Comparison | None:
        for c in self.comparisons:
            if (c.network, c.split, c.a, c.b) == (network, split, a, b):
                return c
        return None


def _split_metrics(obj: Any, where: str, task: str) -> SplitMetrics:
    if task == SEGMENTATION:
        extra = [m for m in SEG_OPTIONAL if isinstance(obj, Mapping) and m in obj]
        metrics = (*SEG_METRICS, *extra)
        return SplitMetrics(
            values={m: num(obj, m, where) for m in metrics},
            cis={
                m: interval(obj, f"{m}_ci", where) if m in SEG_METRICS or f"{m}_ci" in obj else None
                for m in metrics
            },
            threshold=None,
            n=count(obj, "n", where),
            n_pos=None,
            n_pixels=count(obj, "n_pixels", where),
        )
    return SplitMetrics(
        values={m: num(obj, m, where) for m in METRICS},
        cis={m: interval(obj, f"{m}_ci", where) for m in METRICS},
        threshold=num(obj, "threshold", where),
        n=count(obj, "n", where),
        n_pos=count(obj, "n_pos", where),
    )


def _task(m: Any) -> str:
    task = m.get("task", CLASSIFICATION) if isinstance(m, Mapping) else CLASSIFICATION
    if task not in TASKS:
        raise fail(RESULTS, "meta.task", f"not one of {', '.join(TASKS)}:")
    return str(task)


def _pretrain(raw: Any) -> Pretrain | None:
    """``meta.budget.pretrain``; absent in studies without one (and in older results)."""
    if raw is None:
        return None
    where = "meta.budget.pretrain"
    models = get(raw, "models", where)
    if not isinstance(models, Mapping):
        raise fail(RESULTS, f"{where}.models", "not a mapping:")
    val = {}
    for m in models:
        v = get(models[m], "val", f"{where}.models.{m}")
        val[m] = {k: x for k in v if (x := num(v, k, f"{where}.models.{m}.val")) is not None}
    return Pretrain(
        source=text(raw, "source", where),
        epochs=count(raw, "epochs", where),
        train_images={m: count(models[m], "train_images", f"{where}.models.{m}") for m in models},
        val=val,
    )


def _meta(raw: Any) -> Meta:
    m = get(raw, "meta", "")
    task = _task(m)
    networks = texts(m, "networks", "meta")
    models = get(m, "models", "meta")
    budget = get(m, "budget", "meta")
    boot = get(m, "bootstrap", "meta")
    comm = get(m, "communication", "meta")
    hist = get(m, "histories", "meta")
    ext = get(m, "external_site", "meta")
    if ext is not None and not isinstance(ext, str):
        raise fail(RESULTS, "meta.external_site", "not a string or null:")
    pooled_epochs = num(budget, "pooled_epochs", "meta.budget")
    seg = task == SEGMENTATION
    return Meta(
        name=text(m, "name", "meta"),
        created=text(m, "created", "meta"),
        medfed_version=text(m, "medfed_version", "meta"),
        device=text(m, "device", "meta"),
        strategy=text(m, "strategy", "meta"),
        networks=networks,
        models={n: text(models, n, "meta.models") for n in networks},
        paradigms=texts(m, "paradigms", "meta"),
        sites=texts(m, "sites", "meta"),
        external_site=ext,
        budget=Budget(
            pooled_epochs=pooled_epochs if pooled_epochs is not None else float("nan"),
            rounds=count(budget, "rounds", "meta.budget"),
            train_images=count(budget, "train_images", "meta.budget"),
            pretrain=_pretrain(budget.get("pretrain")),
        ),
        threshold_rule=None if seg else text(m, "threshold_rule", "meta"),
        bootstrap=Bootstrap(
            n_resamples=count(boot, "n_resamples", "meta.bootstrap"),
            level=num(boot, "level", "meta.bootstrap") or float("nan"),
            seed=count(boot, "seed", "meta.bootstrap"),
        ),
        communication={
            n: Communication(
                rounds=count(c, "rounds", f"meta.communication.{n}"),
                bytes_up=count(c, "bytes_up", f"meta.communication.{n}"),
                bytes_down=count(c, "bytes_down", f"meta.communication.{n}"),
                bytes_per_round=num(c, "bytes_per_round", f"meta.communication.{n}"),
            )
            for n in networks
            if isinstance(comm, Mapping) and n in comm  # only networks with a federated run
            for c in [comm[n]]
        },
        histories={
            n: _paths(get(hist, n, "meta.histories"), f"meta.histories.{n}") for n in networks
        },
        task=task,
        # Older classification files do not list their metrics; segmentation ones must.
        metrics=texts(m, "metrics", "meta") if seg or "metrics" in m else METRICS,
        overlays=_paths(m.get("overlays", {}), "meta.overlays") if seg else {},
    )


def _paths(obj: Any, where: str) -> dict[str, str]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, str) for v in obj.values()):
        raise fail(RESULTS, where, "not a mapping of paths:")
    return dict(obj)


def _inside(directory: Path, rel: str, where: str, what: str) -> Path:
    """``directory / rel``, refusing a path that leads out of the study directory."""
    path = (directory / rel).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise fail(RESULTS, where, f"{what} path outside the study directory:")
    return path


def _predictions(path: Path) -> dict[tuple[str, str, str], Curve]:
    """Group rows by (network, paradigm, split); per-site curves are internal rows by ``site``."""
    if not path.is_file():
        raise ValueError(f"{PREDICTIONS}: file not found in {path.parent}")
    columns = ("network", "paradigm", "split", "site", "case_id", "label", "score")
    rows: dict[tuple[str, str, str], tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        for col in columns:
            if col not in (reader.fieldnames or ()):
                raise fail(PREDICTIONS, col, "missing column")
        for line, row in enumerate(reader, start=2):
            try:
                label, score = int(row["label"]), float(row["score"])
            except (TypeError, ValueError):
                raise fail(PREDICTIONS, f"label/score on line {line}", "unreadable") from None
            if label not in (0, 1):
                raise fail(PREDICTIONS, f"label on line {line}", "label not 0/1:")
            keys = [(row["network"], row["paradigm"], row["split"])]
            if row["split"] == INTERNAL:
                keys.append((row["network"], row["paradigm"], SITE_PREFIX + row["site"]))
            for key in keys:
                rows[key][0].append(label)
                rows[key][1].append(score)
    return {k: Curve(np.asarray(ls, dtype=np.int8), np.asarray(ss)) for k, (ls, ss) in rows.items()}


def _overlay(directory: Path, rel: str | None, where: str) -> Overlay:
    if rel is None:
        return Overlay(None, None, "no overlay image recorded in results.json")
    path = _inside(directory, rel, where, "overlay")
    if not path.is_file():
        return Overlay(rel, None, f"overlay image not found: {rel}")
    png = path.read_bytes()
    if not png.startswith(PNG_SIGNATURE) or len(png) < 24:
        return Overlay(rel, None, f"overlay image is not a PNG file: {rel}")
    return Overlay(rel, png)


def _comparison(obj: Any, where: str, task: str) -> Comparison:
    if task == SEGMENTATION:
        return Comparison(
            network=text(obj, "network", where),
            split=text(obj, "split", where),
            a=text(obj, "a", where),
            b=text(obj, "b", where),
            value_a=num(obj, "mean_a", where),
            value_b=num(obj, "mean_b", where),
            difference=num(obj, "difference", where),
            statistic=num(obj, "statistic", where),
            p_value=num(obj, "p_value", where),
            metric=text(obj, "metric", where),
            test=text(obj, "test", where),
            n=count(obj, "n", where),
        )
    return Comparison(
        network=text(obj, "network", where),
        split=text(obj, "split", where),
        a=text(obj, "a", where),
        b=text(obj, "b", where),
        value_a=num(obj, "auc_a", where),
        value_b=num(obj, "auc_b", where),
        difference=num(obj, "difference", where),
        statistic=num(obj, "z", where),
        p_value=num(obj, "p_value", where),
    )


def _timing(obj: Any, where: str) -> Timing:
    images = num(obj, "train_images", where)
    return Timing(
        seconds=num(obj, "seconds", where),
        train_images=None if images is None else int(images),
        images_per_s=num(obj, "images_per_s", where),
    )


def load_study(directory: Path) -> Study:
    """Everything the report shows, validated; reads nothing outside ``directory``."""
    directory = Path(directory)
    path = directory / RESULTS
    if not path.is_file():
        raise ValueError(f"{RESULTS}: file not found in {directory}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{RESULTS}: not valid JSON ({err})") from None
    meta = _meta(raw)
    task = meta.task
    # Internal validation is the one split every model has; the writer leaves out a split with
    # no cases (a site without validation data, an empty external set).
    optional = [s for s in meta.splits if s != INTERNAL] + [SITE_PREFIX + s for s in meta.sites]
    results = {
        n: {
            p: {
                s: _split_metrics(get(by_p, s, f"{n}.{p}"), f"{n}.{p}.{s}", task)
                for s in (INTERNAL, *optional)
                if s == INTERNAL or (isinstance(by_p, Mapping) and s in by_p)
            }
            for p in meta.paradigms
            for by_p in [get(get(raw, n, ""), p, n)]
        }
        for n in meta.networks
    }
    comparisons_raw = get(raw, "comparisons", "")
    if not isinstance(comparisons_raw, list):
        raise fail(RESULTS, "comparisons", "not a list:")
    comparisons = tuple(
        _comparison(c, f"comparisons[{i}]", task) for i, c in enumerate(comparisons_raw)
    )
    timing_raw = get(raw, "timing", "")
    timing = {
        n: {
            p: _timing(get(get(timing_raw, n, "timing"), p, f"timing.{n}"), f"timing.{n}.{p}")
            for p in meta.paradigms
        }
        for n in meta.networks
    }
    histories = {
        n: {
            p: read_history(_inside(directory, rel, f"meta.histories.{n}.{p}", "history"))
            for p, rel in meta.histories[n].items()
        }
        for n in meta.networks
    }
    overlays = (
        {n: _overlay(directory, meta.overlays.get(n), f"meta.overlays.{n}") for n in meta.networks}
        if meta.segmentation
        else {}
    )
    return Study(
        directory=directory,
        config_hash=str(get(raw, "config_hash", "")),
        meta=meta,
        results=results,
        comparisons=comparisons,
        timing=timing,
        # A segmentation study writes per-image counts to segmentation.csv instead; results.json
        # already holds everything the report shows.
        predictions={} if meta.segmentation else _predictions(directory / PREDICTIONS),
        histories=histories,
        overlays=overlays,
        privacy=read_privacy(raw, meta.networks),
        decentral=read_decentral(raw, meta.networks, directory),
    )
