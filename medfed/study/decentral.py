"""The study blocks of the paradigms without a training server: cyclic, gossip and one-shot.

In the main tables each of them contributes one model, scored like every other: the consensus
average of the sites' final models (cyclic, gossip) or the distilled student (one-shot). What
the main tables cannot show is what makes these paradigms different, so ``results.json`` gets
two more top-level blocks:

- ``peer``: per network and peer paradigm, every site's *own* final model (from the run's last
  checkpoint) scored on the pooled internal validation, on its own site's validation and on the
  external site; the spread over sites (min, max, mean, population std); the consensus on the
  same cases; and the bytes each site moved (the run's ``summary.json``). Each model's accuracy
  is taken at its own Youden threshold on pooled internal validation, the main tables' rule, so
  the consensus row equals the main table's point estimates.
- ``one_shot``: per network, transfers and bytes per site against FedAvg after 1 round and after
  all R rounds, and the validation AUC/accuracy of one-shot, FedAvg-1, FedAvg-R and centralized.
  All four rows come from the runs' own ``history.jsonl`` rows (pooled internal validation,
  accuracy at the 0.5 argmax, the engine's rule), so they share one definition. FedAvg-1 is the
  study's FedAvg run after its first round (checkpoints keep only the last rounds; the round-0
  history row holds what it scored), i.e. after 1/R of the training budget. Model selection
  never sees a test split: one-shot picks its distillation epoch on internal validation.

Everything here works on predictions and run files; nothing about a patient is read or written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfed.metrics.binary import Metric, threshold_metrics, youden_threshold
from medfed.metrics.classification import roc_auc
from medfed.study import runs, stats
from medfed.study.stats import ModelKey, Split, SplitScores
from medfed.types import Paradigm, StrEnum

PEER_PARADIGMS = (Paradigm.CYCLIC, Paradigm.GOSSIP)


class Block(StrEnum):
    """Top-level keys of results.json written by this module."""

    PEER = "peer"
    ONE_SHOT = "one_shot"


class Row(StrEnum):
    """Rows of a one-shot block: what one-shot is compared with."""

    ONE_SHOT = "one_shot"
    FEDERATED_1 = "federated_1_round"
    FEDERATED = "federated"
    CENTRALIZED = "centralized"


OWN_SITE = "own_site"
"""Peer block: a site model on its own site's validation split."""
POINT_METRICS = ("auc", "accuracy")
SPREAD_STATS = ("min", "max", "mean", "std")


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def point(data: SplitScores, *, threshold: float) -> dict[str, Any]:
    """AUC and accuracy at ``threshold`` (``None`` where undefined, e.g. one class only)."""
    y, s = data.labels, data.scores
    if len(y) == 0:
        return {"auc": None, "accuracy": None, "n": 0}
    acc = threshold_metrics(y, s, threshold)[Metric.ACCURACY]
    return {"auc": _num(roc_auc(y, s)), "accuracy": _num(acc), "n": len(y)}


def model_points(splits: Mapping[Split, SplitScores], *, site: str | None) -> dict[str, Any]:
    """One model on internal, external and (a site model) its own site's validation."""
    internal = splits[Split.INTERNAL]
    threshold = float(youden_threshold(internal.labels, internal.scores))
    out: dict[str, Any] = {"threshold": threshold}
    out[str(Split.INTERNAL)] = point(internal, threshold=threshold)
    if site is not None:
        out[OWN_SITE] = point(internal.where_site(site), threshold=threshold)
    if Split.EXTERNAL in splits:
        out[str(Split.EXTERNAL)] = point(splits[Split.EXTERNAL], threshold=threshold)
    return out


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Min, max, mean and population std (ddof 0) of the defined values; all ``None`` if none."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return dict.fromkeys(SPREAD_STATS)
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=0)),
    }


def peer_entry(
    consensus: Mapping[Split, SplitScores],
    site_models: Mapping[str, Mapping[Split, SplitScores]],
    run_summary: Mapping[str, Any],
) -> dict[str, Any]:
    """One peer run's block: site models, their spread, the consensus, bytes per site."""
    sites = {s: model_points(splits, site=s) for s, splits in site_models.items()}
    cons = model_points(consensus, site=None)
    splits = [str(Split.INTERNAL), OWN_SITE] + (
        [str(Split.EXTERNAL)] if str(Split.EXTERNAL) in cons else []
    )
    spreads = {
        split: {m: spread([sites[s][split][m] for s in sites]) for m in POINT_METRICS}
        for split in splits
    }
    versus_mean = {
        split: {
            m: None
            if (c := cons[split][m]) is None or (mu := spreads[split][m]["mean"]) is None
            else c - mu  # fmt: skip
            for m in POINT_METRICS
        }
        for split in splits
        if split in cons
    }
    peer = run_summary.get("peer", {})
    return {
        "topology": str(peer.get("topology", run_summary.get("paradigm"))),
        "rounds": int(run_summary.get("rounds", 0)),
        "bytes_per_site": {s: int(n) for s, n in peer.get("bytes_per_site", {}).items()},
        "consensus": cons,
        "site_models": sites,
        "spread": spreads,
        "consensus_minus_mean": versus_mean,
    }


# --- one-shot ---


def _scores(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A history row's validation metrics (pooled internal, external) and how many rounds in."""
    if row is None:
        return None

    def pick(block: Any) -> dict[str, float | None] | None:
        if not isinstance(block, Mapping):
            return None
        return {"auc": _num(block.get("auc")), "accuracy": _num(block.get("acc"))}

    return {
        "rounds_done": int(row["round"]) + 1,
        "internal": pick(row.get("val")),
        "external": pick(row.get("external")),
    }


def _fedavg_traffic(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """The most transfers and bytes any one site made over ``rows``: per round a participant
    downloads the global model and uploads its update (2 transfers) and carries an equal share
    of the round's bytes."""
    transfers: dict[str, int] = {}
    moved: dict[str, float] = {}
    for row in rows:
        people = list(row.get("participants") or [])
        share = (int(row["bytes_up"]) + int(row["bytes_down"])) / max(len(people), 1)
        for site in people:
            transfers[site] = transfers.get(site, 0) + 2
            moved[site] = moved.get(site, 0.0) + share
    return max(transfers.values(), default=0), round(max(moved.values(), default=0.0))


def one_shot_entry(
    *,
    out_dir: Path,
    one_shot_dir: Path,
    federated_dir: Path | None,
    centralized_dir: Path | None,
) -> dict[str, Any]:
    """One network's one-shot block, from the runs' files (see the module docstring)."""
    summary = runs.summary(one_shot_dir)
    info = summary.get("one_shot", {})
    shot_rows = runs.rounds(one_shot_dir)
    figure = info.get("synthesis_figure")
    rows: dict[str, dict[str, Any] | None] = {
        Row.ONE_SHOT: {
            "transfers_per_site": int(info.get("transfers_per_site", 1)),
            "bytes_per_site": int(info.get("bytes_per_site_up", 0)),
            "history": str((one_shot_dir / "history.jsonl").relative_to(out_dir)),
            **(_scores(shot_rows[-1] if shot_rows else None) or {}),
        },
        Row.FEDERATED_1: None,
        Row.FEDERATED: None,
        Row.CENTRALIZED: None,
    }
    if federated_dir is not None:
        fed_rows = runs.rounds(federated_dir)
        hist = str((federated_dir / "history.jsonl").relative_to(out_dir))
        for key, upto in ((Row.FEDERATED_1, 1), (Row.FEDERATED, len(fed_rows))):
            if not fed_rows:
                continue
            transfers, nbytes = _fedavg_traffic(fed_rows[:upto])
            rows[key] = {
                "transfers_per_site": transfers,
                "bytes_per_site": nbytes,
                "history": hist,
                **(_scores(fed_rows[upto - 1]) or {}),
            }
    if centralized_dir is not None:
        cen_rows = runs.rounds(centralized_dir)
        if cen_rows:
            rows[Row.CENTRALIZED] = {
                "transfers_per_site": None,  # the data itself was pooled
                "bytes_per_site": None,
                "history": str((centralized_dir / "history.jsonl").relative_to(out_dir)),
                **(_scores(cen_rows[-1]) or {}),
            }
    return {
        "teachers": dict(info.get("teachers", {})),
        "best_epoch": info.get("best_epoch"),
        "distill_epochs": len(info.get("validation", [])),
        "selection": "distillation epoch with the best pooled internal validation AUC",
        "synthesis_figure": (
            None if figure is None else str((one_shot_dir / figure).relative_to(out_dir))
        ),
        "rows": {str(k): v for k, v in rows.items()},
    }


def versus_centralized(
    predictions: Mapping[ModelKey, Mapping[Split, SplitScores]], *, networks: Sequence[str]
) -> list[dict[str, Any]]:
    """DeLong tests of each peer/one-shot model against centralized, on the same cases (the
    main comparisons already test FedAvg against every other model)."""
    out: list[dict[str, Any]] = []
    central = str(Paradigm.CENTRALIZED)
    for network in networks:
        ref = predictions.get((network, central))
        if ref is None:
            continue
        for paradigm in (*PEER_PARADIGMS, Paradigm.ONE_SHOT):
            mine = predictions.get((network, str(paradigm)))
            if mine is None:
                continue
            for split in Split:
                if split not in mine or split not in ref or len(mine[split]) == 0:
                    continue
                a, b = mine[split], ref[split]
                if a.case_ids != b.case_ids:
                    raise ValueError(f"{network}: {paradigm} and {central} scored different cases")
                y = a.labels
                if not 0 < int(y.sum()) < len(y):
                    continue
                out.append(stats.delong_row(network, split, str(paradigm), central, a, b))
    return out
