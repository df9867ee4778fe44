"""From per-case scores to the study's numbers: AUC with DeLong CIs, operating-point metrics with
bootstrap CIs, and paired DeLong comparisons.

Everything here works from predictions alone (the same rows written to ``predictions.csv``), so
anyone can recompute the study's statistics from that file, and the tests check that this module
does exactly that.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from medfed.metrics.binary import Metric, bootstrap_metrics, youden_threshold
from medfed.metrics.delong import auc_with_ci, delong_test
from medfed.seeding import derive_seed
from medfed.types import Paradigm, StrEnum


class Split(StrEnum):
    INTERNAL = "internal"
    EXTERNAL = "external"


SITE_PREFIX = "site:"
LOCAL_PREFIX = f"{Paradigm.LOCAL}:"
CSV_COLUMNS = ("network", "paradigm", "split", "site", "case_id", "label", "score")


def local_key(site: str) -> str:
    """Paradigm key of the model trained only at ``site``."""
    return f"{LOCAL_PREFIX}{site}"


@dataclass(frozen=True)
class SplitScores:
    """One model's scores on one split, case by case, in a fixed order shared by every model."""

    sites: tuple[str, ...]
    case_ids: tuple[str, ...]
    labels: np.ndarray  # int (n,), 1 = positive (malignant)
    scores: np.ndarray  # float (n,), predicted probability of the positive class

    def __post_init__(self) -> None:
        n = len(self.labels)
        if not (len(self.sites) == len(self.case_ids) == len(self.scores) == n):
            raise ValueError("sites, case_ids, labels and scores must have one entry per case")

    def __len__(self) -> int:
        return len(self.labels)

    def where_site(self, site: str) -> SplitScores:
        keep = np.array([s == site for s in self.sites], dtype=bool)
        idx = np.flatnonzero(keep)
        return SplitScores(
            sites=tuple(self.sites[i] for i in idx),
            case_ids=tuple(self.case_ids[i] for i in idx),
            labels=self.labels[keep],
            scores=self.scores[keep],
        )


ModelKey = tuple[str, str]  # (network, paradigm key)
Predictions = Mapping[ModelKey, Mapping[Split, SplitScores]]


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def split_metrics(
    data: SplitScores, *, threshold: float, resamples: int, level: float, seed: int
) -> dict[str, Any]:
    """AUC [DeLong CI] and every operating-point metric [bootstrap CI] at a fixed threshold."""
    y, s = data.labels, data.scores
    n_pos = int(y.sum())
    out: dict[str, Any] = {"threshold": float(threshold), "n": len(y), "n_pos": n_pos}
    if 0 < n_pos < len(y):
        est = auc_with_ci(y, s, level=level)
        out["auc"], out["auc_ci"] = _num(est.auc), [_num(est.ci[0]), _num(est.ci[1])]
        boot = bootstrap_metrics(y, s, threshold, n_resamples=resamples, level=level, seed=seed)
        for metric in Metric:
            ci = boot[metric]
            out[str(metric)] = _num(ci.estimate)
            out[f"{metric}_ci"] = [_num(ci.low), _num(ci.high)]
    else:  # one class only: no ROC curve, no sensitivity/specificity pair
        out["auc"], out["auc_ci"] = None, [None, None]
        for metric in Metric:
            out[str(metric)], out[f"{metric}_ci"] = None, [None, None]
    return out


S = TypeVar("S", bound="Scored")


class Scored(Protocol):
    """Per-case results of one model on one split (classification scores or seg counts)."""

    @property
    def case_ids(self) -> tuple[str, ...]: ...

    def __len__(self) -> int: ...

    def where_site(self: S, site: str) -> S: ...


def report_splits(splits: Mapping[Split, S], *, site_names: Sequence[str]) -> list[tuple[str, S]]:
    """The splits results.json reports for one model: internal, external, then each site's own."""
    internal = splits[Split.INTERNAL]
    parts: list[tuple[str, S]] = [(str(Split.INTERNAL), internal)]
    if Split.EXTERNAL in splits:
        parts.append((str(Split.EXTERNAL), splits[Split.EXTERNAL]))
    parts += [(f"{SITE_PREFIX}{site}", internal.where_site(site)) for site in site_names]
    return [(name, data) for name, data in parts if len(data)]


def bootstrap_seed(seed: int, network: str, paradigm: str, split: str) -> int:
    """Independent resamples per (model, split), reproducible from the study seed."""
    return derive_seed(seed, "bootstrap", network, paradigm, split) % (2**32)


def paired_models(
    predictions: Mapping[ModelKey, Mapping[Split, S]], *, networks: Sequence[str]
) -> Iterator[tuple[str, Split, str, S, S]]:
    """(network, split, other, federated, other's) for every comparison a study reports:
    federated vs centralized, then vs each local model, on the very same cases."""
    fed_key = str(Paradigm.FEDERATED)
    for network in networks:
        fed = predictions.get((network, fed_key))
        if fed is None:
            continue
        others = sorted(
            (p for (n, p) in predictions if n == network and p != fed_key),
            key=lambda p: (p != str(Paradigm.CENTRALIZED), p),
        )
        for split in Split:
            if split not in fed or len(fed[split]) == 0:
                continue
            a = fed[split]
            for other in others:
                b = predictions[(network, other)][split]
                if b.case_ids != a.case_ids:
                    raise ValueError(
                        f"{network}: {other} and {fed_key} were scored on different {split} cases"
                    )
                yield network, split, other, a, b


def collect(
    predictions: Mapping[ModelKey, Mapping[Split, S]],
    *,
    networks: Sequence[str],
    score: Callable[[str, str, Mapping[Split, S]], dict[str, dict[str, Any]]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{network: {paradigm: score(network, paradigm, splits)}}`` in the study's network order."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for (network, paradigm), splits in predictions.items():
        results.setdefault(network, {})[paradigm] = score(network, paradigm, splits)
    return {n: results[n] for n in networks if n in results}


def model_results(
    network: str,
    paradigm: str,
    splits: Mapping[Split, SplitScores],
    *,
    site_names: Sequence[str],
    resamples: int,
    level: float,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """One model's block of results.json; the threshold is Youden's J on internal validation."""
    internal = splits[Split.INTERNAL]
    threshold = youden_threshold(internal.labels, internal.scores)
    return {
        name: split_metrics(
            data,
            threshold=threshold,
            resamples=resamples,
            level=level,
            seed=bootstrap_seed(seed, network, paradigm, name),
        )
        for name, data in report_splits(splits, site_names=site_names)
    }


def comparisons(predictions: Predictions, *, networks: Sequence[str]) -> list[dict[str, Any]]:
    """Federated vs centralized and vs each local model, paired on the same cases (DeLong)."""
    out: list[dict[str, Any]] = []
    for network, split, other, a, b in paired_models(predictions, networks=networks):
        y = a.labels
        if not 0 < int(y.sum()) < len(y):
            continue  # one class only: no ROC curve to compare
        out.append(delong_row(network, split, str(Paradigm.FEDERATED), other, a, b))
    return out


def delong_row(
    network: str, split: Split, a_name: str, b_name: str, a: SplitScores, b: SplitScores
) -> dict[str, Any]:
    """One ``comparisons`` entry of results.json: DeLong's test of model a against model b."""
    t = delong_test(a.labels, a.scores, b.scores)
    return {
        "network": network,
        "split": str(split),
        "a": a_name,
        "b": b_name,
        "auc_a": t.auc_a,
        "auc_b": t.auc_b,
        "difference": t.difference,
        "z": t.z,
        "p_value": t.p_value,
    }


def study_results(
    predictions: Mapping[ModelKey, Mapping[Split, Any]],
    *,
    networks: Sequence[str],
    site_names: Sequence[str],
    resamples: int,
    level: float,
    seed: int,
    score: Callable[..., dict[str, dict[str, Any]]] = model_results,
    compare: Callable[..., list[dict[str, Any]]] = comparisons,
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[dict[str, Any]]]:
    """``{network: {paradigm: {split: metrics}}}`` and the paired comparisons.

    ``score``/``compare`` are the task's: DeLong and bootstrap here by default, Dice and
    Wilcoxon from :mod:`medfed.study.segmentation`.
    """

    def one(network: str, paradigm: str, splits: Mapping[Split, Any]) -> dict[str, Any]:
        return score(network, paradigm, splits, site_names=site_names,
                     resamples=resamples, level=level, seed=seed)  # fmt: skip

    results = collect(predictions, networks=networks, score=one)
    return results, compare(predictions, networks=networks)


# --- predictions.csv ---


def write_predictions(path: Path, predictions: Predictions) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for (network, paradigm), splits in predictions.items():
            for split, data in splits.items():
                for site, case, label, score in zip(
                    data.sites, data.case_ids, data.labels, data.scores, strict=True
                ):
                    writer.writerow(
                        [network, paradigm, str(split), site, case, int(label), repr(float(score))]
                    )


def read_predictions(path: Path) -> dict[ModelKey, dict[Split, SplitScores]]:
    """The inverse of :func:`write_predictions`; a malformed file names the row and column."""
    rows: dict[tuple[str, str, Split], list[tuple[str, str, int, float]]] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = sorted(set(CSV_COLUMNS) - set(reader.fieldnames or ()))
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        for line, row in enumerate(reader, start=2):
            try:
                split_key = Split(row["split"])
                item = (row["site"], row["case_id"], int(row["label"]), float(row["score"]))
            except ValueError as err:
                raise ValueError(f"{path}, line {line}: {err}") from None
            rows.setdefault((row["network"], row["paradigm"], split_key), []).append(item)
    out: dict[ModelKey, dict[Split, SplitScores]] = {}
    for (network, paradigm, split_key), items in rows.items():
        out.setdefault((network, paradigm), {})[split_key] = _from_items(items)
    return out


def _from_items(items: Iterable[tuple[str, str, int, float]]) -> SplitScores:
    sites, cases, labels, scores = zip(*items, strict=True)
    return SplitScores(
        sites=tuple(sites),
        case_ids=tuple(cases),
        labels=np.asarray(labels, dtype=np.int64),
        scores=np.asarray(scores, dtype=np.float64),
    )
