"""Read a study directory into typed, validated values.

The study writer and the report are written separately; a schema drift should fail here, loudly
and naming the file and the field, rather than as a blank cell or a ``KeyError`` deep in a figure.
Histories are the one soft input: a run that recorded none still deserves a report.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.metrics.binary import Metric

# The study writer owns the schema's names; the report reads them from there.
from medfed.study.stats import LOCAL_PREFIX as LOCAL_PREFIX
from medfed.study.stats import SITE_PREFIX as SITE_PREFIX
from medfed.study.stats import Split
from medfed.types import Paradigm

RESULTS = "results.json"
PREDICTIONS = "predictions.csv"

METRICS = ("auc", *(str(m) for m in Metric))
INTERNAL = str(Split.INTERNAL)
EXTERNAL = str(Split.EXTERNAL)
CENTRALIZED = str(Paradigm.CENTRALIZED)
FEDERATED = str(Paradigm.FEDERATED)

CI = tuple[float | None, float | None]


@dataclass(frozen=True)
class SplitMetrics:
    """One model on one evaluation split; ``None`` where a metric is undefined (no positives...)."""

    values: Mapping[str, float | None]
    cis: Mapping[str, CI | None]
    threshold: float | None
    n: int
    n_pos: int

    def value(self, metric: str) -> float | None:
        return self.values.get(metric)

    def ci(self, metric: str) -> CI | None:
        return self.cis.get(metric)


EMPTY = SplitMetrics(values={}, cis={}, threshold=None, n=0, n_pos=0)
"""A split with no cases (a site without validation data): every metric undefined."""


@dataclass(frozen=True)
class Comparison:
    network: str
    split: str
    a: str
    b: str
    auc_a: float | None
    auc_b: float | None
    difference: float | None
    z: float | None
    p_value: float | None


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
class Budget:
    pooled_epochs: float
    rounds: int
    train_images: int


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
    threshold_rule: str
    bootstrap: Bootstrap
    communication: Mapping[str, Communication]
    histories: Mapping[str, Mapping[str, str]]

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
class RoundPoint:
    round: int
    val_auc: float | None
    external_auc: float | None
    train_loss: float | None


@dataclass(frozen=True)
class Study:
    directory: Path
    config_hash: str
    meta: Meta
    results: Mapping[str, Mapping[str, Mapping[str, SplitMetrics]]]
    comparisons: tuple[Comparison, ...]
    timing: Mapping[str, Mapping[str, Timing]]
    predictions: Mapping[tuple[str, str, str], Curve]
    histories: Mapping[str, Mapping[str, tuple[RoundPoint, ...] | None]]

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


def _fail(file: str, field: str, problem: str = "missing field") -> ValueError:
    return ValueError(f"{file}: {problem} '{field}'")


def _get(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise _fail(RESULTS, f"{where}.{key}" if where else key)
    return obj[key]


def _num(obj: Any, key: str, where: str) -> float | None:
    """A number or ``None``; NaN (allowed in the writer's JSON) is as undefined as null."""
    v = _get(obj, key, where)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _fail(RESULTS, f"{where}.{key}", "not a number:")
    return None if math.isnan(v) else float(v)


def _int(obj: Any, key: str, where: str) -> int:
    v = _num(obj, key, where)
    if v is None:
        raise _fail(RESULTS, f"{where}.{key}", "null where a count is needed:")
    return int(v)


def _str(obj: Any, key: str, where: str) -> str:
    v = _get(obj, key, where)
    if not isinstance(v, str):
        raise _fail(RESULTS, f"{where}.{key}", "not a string:")
    return v


def _strs(obj: Any, key: str, where: str) -> tuple[str, ...]:
    v = _get(obj, key, where)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _fail(RESULTS, f"{where}.{key}", "not a list of strings:")
    return tuple(v)


def _ci(obj: Any, key: str, where: str) -> CI | None:
    v = _get(obj, key, where)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 2:
        raise _fail(RESULTS, f"{where}.{key}", "not a [low, high] pair:")
    pair = {"lo": v[0], "hi": v[1]}
    return (_num(pair, "lo", f"{where}.{key}"), _num(pair, "hi", f"{where}.{key}"))


def _split_metrics(obj: Any, where: str) -> SplitMetrics:
    return SplitMetrics(
        values={m: _num(obj, m, where) for m in METRICS},
        cis={m: _ci(obj, f"{m}_ci", where) for m in METRICS},
        threshold=_num(obj, "threshold", where),
        n=_int(obj, "n", where),
        n_pos=_int(obj, "n_pos", where),
    )


def _meta(raw: Any) -> Meta:
    m = _get(raw, "meta", "")
    networks = _strs(m, "networks", "meta")
    models = _get(m, "models", "meta")
    budget = _get(m, "budget", "meta")
    boot = _get(m, "bootstrap", "meta")
    comm = _get(m, "communication", "meta")
    hist = _get(m, "histories", "meta")
    ext = _get(m, "external_site", "meta")
    if ext is not None and not isinstance(ext, str):
        raise _fail(RESULTS, "meta.external_site", "not a string or null:")
    pooled_epochs = _num(budget, "pooled_epochs", "meta.budget")
    return Meta(
        name=_str(m, "name", "meta"),
        created=_str(m, "created", "meta"),
        medfed_version=_str(m, "medfed_version", "meta"),
        device=_str(m, "device", "meta"),
        strategy=_str(m, "strategy", "meta"),
        networks=networks,
        models={n: _str(models, n, "meta.models") for n in networks},
        paradigms=_strs(m, "paradigms", "meta"),
        sites=_strs(m, "sites", "meta"),
        external_site=ext,
        budget=Budget(
            pooled_epochs=pooled_epochs if pooled_epochs is not None else float("nan"),
            rounds=_int(budget, "rounds", "meta.budget"),
            train_images=_int(budget, "train_images", "meta.budget"),
        ),
        threshold_rule=_str(m, "threshold_rule", "meta"),
        bootstrap=Bootstrap(
            n_resamples=_int(boot, "n_resamples", "meta.bootstrap"),
            level=_num(boot, "level", "meta.bootstrap") or float("nan"),
            seed=_int(boot, "seed", "meta.bootstrap"),
        ),
        communication={
            n: Communication(
                rounds=_int(c, "rounds", f"meta.communication.{n}"),
                bytes_up=_int(c, "bytes_up", f"meta.communication.{n}"),
                bytes_down=_int(c, "bytes_down", f"meta.communication.{n}"),
                bytes_per_round=_num(c, "bytes_per_round", f"meta.communication.{n}"),
            )
            for n in networks
            if isinstance(comm, Mapping) and n in comm  # only networks with a federated run
            for c in [comm[n]]
        },
        histories={n: _paths(_get(hist, n, "meta.histories"), n) for n in networks},
    )


def _paths(obj: Any, network: str) -> dict[str, str]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, str) for v in obj.values()):
        raise _fail(RESULTS, f"meta.histories.{network}", "not a mapping of paths:")
    return dict(obj)


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
                raise _fail(PREDICTIONS, col, "missing column")
        for line, row in enumerate(reader, start=2):
            try:
                label, score = int(row["label"]), float(row["score"])
            except (TypeError, ValueError):
                raise _fail(PREDICTIONS, f"label/score on line {line}", "unreadable") from None
            if label not in (0, 1):
                raise _fail(PREDICTIONS, f"label on line {line}", "label not 0/1:")
            keys = [(row["network"], row["paradigm"], row["split"])]
            if row["split"] == INTERNAL:
                keys.append((row["network"], row["paradigm"], SITE_PREFIX + row["site"]))
            for key in keys:
                rows[key][0].append(label)
                rows[key][1].append(score)
    return {k: Curve(np.asarray(ls, dtype=np.int8), np.asarray(ss)) for k, (ls, ss) in rows.items()}


def _history(directory: Path, rel: str, where: str) -> tuple[RoundPoint, ...] | None:
    root = directory.resolve()
    path = (directory / rel).resolve()
    if not path.is_relative_to(root):
        raise _fail(RESULTS, where, "history path outside the study directory:")
    if not path.is_file():
        return None
    points: list[RoundPoint] = []
    for text in path.read_text().splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue  # a half-written last line from an interrupted run
        sites = row.get("sites") or {}
        losses = [(s.get("train_loss"), s.get("examples") or 0) for s in sites.values()]
        losses = [(x, w) for x, w in losses if isinstance(x, int | float) and not math.isnan(x)]
        weight = sum(w for _, w in losses)
        loss = (
            sum(x * w for x, w in losses) / weight
            if weight
            else (float(np.mean([x for x, _ in losses])) if losses else None)
        )
        points.append(
            RoundPoint(
                round=int(row.get("round", len(points))),
                val_auc=_finite(row.get("val_auc")),
                external_auc=_finite(row.get("external_auc")),
                train_loss=loss,
            )
        )
    return tuple(points) or None


def _finite(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)
    return float(v) if ok else None


def _comparison(obj: Any, where: str) -> Comparison:
    return Comparison(
        network=_str(obj, "network", where),
        split=_str(obj, "split", where),
        a=_str(obj, "a", where),
        b=_str(obj, "b", where),
        auc_a=_num(obj, "auc_a", where),
        auc_b=_num(obj, "auc_b", where),
        difference=_num(obj, "difference", where),
        z=_num(obj, "z", where),
        p_value=_num(obj, "p_value", where),
    )


def _timing(obj: Any, where: str) -> Timing:
    images = _num(obj, "train_images", where)
    return Timing(
        seconds=_num(obj, "seconds", where),
        train_images=None if images is None else int(images),
        images_per_s=_num(obj, "images_per_s", where),
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
    # Internal validation is the one split every model has; the writer leaves out a split with
    # no cases (a site without validation data, an empty external set).
    optional = [s for s in meta.splits if s != INTERNAL] + [SITE_PREFIX + s for s in meta.sites]
    results = {
        n: {
            p: {
                s: _split_metrics(_get(by_p, s, f"{n}.{p}"), f"{n}.{p}.{s}")
                for s in (INTERNAL, *optional)
                if s == INTERNAL or (isinstance(by_p, Mapping) and s in by_p)
            }
            for p in meta.paradigms
            for by_p in [_get(_get(raw, n, ""), p, n)]
        }
        for n in meta.networks
    }
    comparisons = tuple(
        _comparison(c, f"comparisons[{i}]") for i, c in enumerate(_get(raw, "comparisons", ""))
    )
    timing_raw = _get(raw, "timing", "")
    timing = {
        n: {
            p: _timing(_get(_get(timing_raw, n, "timing"), p, f"timing.{n}"), f"timing.{n}.{p}")
            for p in meta.paradigms
        }
        for n in meta.networks
    }
    histories = {
        n: {
            p: _history(directory, rel, f"meta.histories.{n}.{p}")
            for p, rel in meta.histories[n].items()
        }
        for n in meta.networks
    }
    return Study(
        directory=directory,
        config_hash=str(_get(raw, "config_hash", "")),
        meta=meta,
        results=results,
        comparisons=comparisons,
        timing=timing,
        predictions=_predictions(directory / PREDICTIONS),
        histories=histories,
    )
