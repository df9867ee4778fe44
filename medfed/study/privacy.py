"""What differential privacy cost in a study: ε spent per run, and the accuracy given up for it.

A DP claim without its ε is no claim, and an ε without the accuracy it cost is no decision, so
``results.json`` carries both:

- ``meta.privacy``: per network, the DP settings it trained with (``dp``, ``None`` without DP),
  what each run spent (``spent``, from that run's ``summary.json``, so the study repeats the
  engine's accountant instead of recomputing it) and, if a budget ran out, why a run stopped;
- ``privacy`` (top level): per DP network that has a *twin* (the first other network in the
  study with the same model and no DP), each paradigm's metrics with and without DP and the drop.

:func:`privacy_cost` reads nothing but the results document, so the report, a notebook or a test
can recompute the comparison from ``results.json`` alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfed.privacy.config import PrivacyConfig
from medfed.study.config import StudyConfig
from medfed.study.segmentation import METRICS as SEGMENTATION_METRICS

CLASSIFICATION_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")
"""Classification metrics the privacy cost compares (the threshold-free AUC first)."""
SPENT_KEYS = ("mode", "delta", "accountant", "max_epsilon", "epsilon", "noise_multiplier", "clip")
"""The fields of a run's privacy record (summary.json) that the study keeps."""


def dp_settings(privacy: PrivacyConfig) -> dict[str, Any] | None:
    """The DP configuration as JSON, or ``None``: a reader must not have to guess the defaults."""
    return None if privacy.dp is None else privacy.dp.model_dump(mode="json")


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN and ±inf become ``None`` (results.json is written with allow_nan off)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def spent(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """What one run spent, from its summary.json's ``privacy`` (the last round's ledger)."""
    record = summary.get("privacy")
    if not isinstance(record, Mapping):
        return None
    return {key: _finite(record.get(key)) for key in SPENT_KEYS}


def privacy_meta(
    config: StudyConfig, run_dirs: Mapping[str, Mapping[str, Path]]
) -> dict[str, dict[str, Any]]:
    """``meta.privacy``: ``{network: {"dp", "spent": {paradigm key: spent | None}, "stopped"?}}``.

    ``run_dirs`` maps each network label and paradigm key (``local:<site>`` for a local-only
    model) to the folder holding that run's ``summary.json``.
    """
    out: dict[str, dict[str, Any]] = {}
    for net in config.networks:
        block: dict[str, Any] = {"dp": dp_settings(config.privacy_of(net)), "spent": {}}
        stopped: dict[str, str] = {}
        for key, run_dir in run_dirs.get(net.label, {}).items():
            summary = json.loads((run_dir / "summary.json").read_text())
            block["spent"][key] = spent(summary)
            if summary.get("stopped"):
                stopped[key] = str(summary["stopped"])
        if stopped:
            block["stopped"] = stopped
        out[net.label] = block
    return out


def _has_dp(doc: Mapping[str, Any], network: str) -> bool:
    info = doc["meta"].get("privacy", {}).get(network) or {}
    return info.get("dp") is not None


def twins(doc: Mapping[str, Any]) -> dict[str, str]:
    """``{DP network: its twin}``: the first other network with the same model and no DP.

    A DP network without one is left out: against a different architecture, a drop would measure
    the architecture as much as the privacy.
    """
    networks: list[str] = list(doc["meta"]["networks"])
    models: Mapping[str, str] = doc["meta"]["models"]
    out: dict[str, str] = {}
    for net in networks:
        if not _has_dp(doc, net):
            continue
        twin = next(
            (n for n in networks if n != net and models[n] == models[net] and not _has_dp(doc, n)),
            None,
        )
        if twin is not None:
            out[net] = twin
    return out


def _number(x: Any) -> float | None:
    ok = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def metric_drop(without_dp: Any, with_dp: Any) -> dict[str, float | None]:
    """Both values, the drop (without minus with: positive = DP cost that much) and the drop in %
    of the value without DP; ``None`` where a value is undefined."""
    a, b = _number(without_dp), _number(with_dp)
    drop = None if a is None or b is None else a - b
    relative = None if drop is None or a is None or a == 0 else 100.0 * drop / a
    return {"without_dp": a, "with_dp": b, "drop": drop, "relative_drop_pct": relative}


def _metrics(doc: Mapping[str, Any]) -> tuple[str, ...]:
    if doc["meta"].get("task", "classification") == "segmentation":
        return SEGMENTATION_METRICS
    return CLASSIFICATION_METRICS


def privacy_cost(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The top-level ``privacy`` block of results.json, from the rest of the document.

    ``{DP network: {"twin", "model", "metrics", "paradigms": {key: {"mode", "epsilon", "delta",
    "accountant", "noise_multiplier", "clip", "stopped", "splits": {split: {metric:
    metric_drop}}}}}}``, for every paradigm key and split both networks were scored on. ``epsilon``
    is the most any site spent (``max_epsilon``): the guarantee is only as good as the weakest.
    """
    meta = doc["meta"]
    metrics = _metrics(doc)
    order: list[str] = list(meta.get("paradigms", []))
    out: dict[str, dict[str, Any]] = {}
    for net, twin in twins(doc).items():
        info = meta["privacy"][net]
        dp: Mapping[str, Any] = info["dp"]
        ours: Mapping[str, Any] = doc.get(net, {})
        theirs: Mapping[str, Any] = doc.get(twin, {})
        keys = [k for k in order if k in ours and k in theirs]
        keys += [k for k in ours if k in theirs and k not in keys]
        paradigms: dict[str, Any] = {}
        for key in keys:
            record = info.get("spent", {}).get(key) or {}
            splits = {
                split: {
                    metric: metric_drop(theirs[key][split].get(metric), values.get(metric))
                    for metric in metrics
                }
                for split, values in ours[key].items()
                if split in theirs[key]
            }
            paradigms[key] = {
                "mode": record.get("mode", dp.get("mode")),
                "epsilon": _number(record.get("max_epsilon")),
                "delta": _number(record.get("delta", dp.get("delta"))),
                "accountant": record.get("accountant", dp.get("accountant")),
                "noise_multiplier": record.get("noise_multiplier"),
                "clip": _number(record.get("clip", dp.get("clip"))),
                "stopped": info.get("stopped", {}).get(key),
                "splits": splits,
            }
        out[net] = {
            "twin": twin,
            "model": meta["models"][net],
            "metrics": list(metrics),
            "paradigms": paradigms,
        }
    return out
