"""Aggregation rules as pure functions over ``Params`` (in the style of Flower's ``aggregate.py``).

No rounds, no state, no I/O: a list of parameter dicts in, one parameter dict out. Strategies
compose these; tests compare them with Flower's numpy versions.

Precision: every rule computes in float64, whatever the stored dtype, so that averaging many
float16/bfloat16/float32 tensors loses nothing to accumulation, and then casts each tensor back to
the dtype of ``like`` (by default the first input). Integer and bool tensors -- BatchNorm's
``num_batches_tracked`` -- are rounded (half to even) before the cast, because truncation would
bias a mean of counts downward.

Order: the rules here are order-invariant up to float64 rounding; strategies additionally sort
updates by site name (``prepare_updates``) so that a round is bit-identical whichever order the
runtime delivered the updates in -- in-process and over Flower alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from medfed.types import ParamKind, Params, Update

COMPUTE_DTYPE = torch.float64

__all__ = [
    "COMPUTE_DTYPE",
    "as_weights",
    "cast_like",
    "coordinate_median",
    "deltas",
    "krum_scores",
    "krum_select",
    "merge",
    "prepare_updates",
    "trimmed_mean",
    "weighted_mean",
]


# --- dtype handling ---


def to_compute(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(COMPUTE_DTYPE)


def cast_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Cast a float64 result back to ``like``'s dtype and device; integers are rounded first."""
    if not (like.dtype.is_floating_point or like.dtype.is_complex):
        t = torch.round(t)
    return t.to(device=like.device, dtype=like.dtype)


def _cast_all(result: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> Params:
    return {k: cast_like(v, like[k]) for k, v in result.items()}


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for server-side optimizer/control state of a tensor: at least float32.

    float16/bfloat16 would underflow squared deltas (FedAdam's v) to zero.
    """
    return torch.promote_types(dtype, torch.float32)


# --- validation ---


def _check_same_structure(params_list: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    if not params_list:
        raise ValueError("cannot aggregate an empty list of parameters")
    keys = list(params_list[0])
    ref = params_list[0]
    for i, p in enumerate(params_list[1:], start=1):
        if set(p) != set(keys):
            diff = sorted(set(p) ^ set(keys))
            raise ValueError(f"parameter set {i} has different keys than set 0: {diff[:5]}")
        for k in keys:
            if p[k].shape != ref[k].shape:
                raise ValueError(
                    f"{k!r}: shape {tuple(p[k].shape)} in set {i} != {tuple(ref[k].shape)}"
                )
    return keys


def _like_for(
    params_list: Sequence[Params], like: Mapping[str, torch.Tensor] | None
) -> Mapping[str, torch.Tensor]:
    return params_list[0] if like is None else like


# --- aggregation rules ---


def _weighted_mean64(params_list: Sequence[Params], weights: Sequence[float]) -> Params:
    keys = _check_same_structure(params_list)
    if len(weights) != len(params_list):
        raise ValueError(f"{len(weights)} weights for {len(params_list)} parameter sets")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    total = math.fsum(w)
    if total <= 0:
        raise ValueError("weights sum to zero")
    out: Params = {}
    for k in keys:
        ref = params_list[0][k]
        # On the updates' own device: a GPU federation aggregates without host copies.
        acc = torch.zeros(ref.shape, dtype=COMPUTE_DTYPE, device=ref.device)
        for p, wi in zip(params_list, w, strict=True):
            acc.add_(to_compute(p[k]).to(ref.device), alpha=wi)
        out[k] = acc.div_(total)
    return out


def weighted_mean(
    params_list: Sequence[Params],
    weights: Sequence[float],
    *,
    like: Mapping[str, torch.Tensor] | None = None,
) -> Params:
    """sum_i w_i x_i / sum_i w_i per tensor -- FedAvg with ``w_i = num_examples``.

    Matches ``flwr.server.strategy.aggregate.aggregate`` (which multiplies by the integer counts
    and divides by their total) up to float rounding.
    """
    return _cast_all(_weighted_mean64(params_list, weights), _like_for(params_list, like))


def _sorted_stack(params_list: Sequence[Params], key: str) -> torch.Tensor:
    """(n, *shape) float64 stack sorted along clients; NaN sorts last (counted as largest)."""
    device = params_list[0][key].device
    stacked = torch.stack([to_compute(p[key]).to(device) for p in params_list])
    return torch.sort(stacked, dim=0).values


def coordinate_median(
    params_list: Sequence[Params], *, like: Mapping[str, torch.Tensor] | None = None
) -> Params:
    """Per-coordinate median; for even n the mean of the two middle values (as ``np.median``).

    ``torch.median`` returns the lower middle value instead, so it is not used.
    """
    keys = _check_same_structure(params_list)
    n = len(params_list)
    out: Params = {}
    for k in keys:
        s = _sorted_stack(params_list, k)
        out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return _cast_all(out, _like_for(params_list, like))


def trim_count(n: int, trim_fraction: float) -> int:
    """How many values are cut at *each* end: floor(trim_fraction * n), as Flower/scipy do."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return int(math.floor(trim_fraction * n))


def trimmed_mean(
    params_list: Sequence[Params], *, trim_fraction: float, like: Params | None = None
) -> Params:
    """Per coordinate, drop the k = floor(trim_fraction * n) largest and k smallest values and
    average the rest.

    Same counting as ``flwr ... aggregate_trimmed_avg(results, proportiontocut)`` and
    ``scipy.stats.trim_mean``; since trim_fraction < 0.5 at least one value always remains.
    """
    keys = _check_same_structure(params_list)
    n = len(params_list)
    cut = trim_count(n, trim_fraction)
    out: Params = {}
    for k in keys:
        s = _sorted_stack(params_list, k)
        out[k] = s[cut : n - cut].mean(dim=0)
    return _cast_all(out, _like_for(params_list, like))


def pairwise_sq_distances(params_list: Sequence[Params]) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances over all tensors concatenated.

    Computed pair by pair as sum((x_i - x_j)^2) rather than via the Gram matrix: slower, but
    without cancellation for nearby models, exactly symmetric, and independent of client order.
    """
    keys = _check_same_structure(params_list)
    n = len(params_list)
    dist = torch.zeros((n, n), dtype=COMPUTE_DTYPE)
    for k in keys:
        device = params_list[0][k].device
        flat = [to_compute(p[k]).to(device).reshape(-1) for p in params_list]
        for i in range(n):
            for j in range(i + 1, n):
                d = float(torch.sum((flat[i] - flat[j]) ** 2))
                dist[i, j] += d
                dist[j, i] += d
    return dist


def krum_scores(params_list: Sequence[Params], *, num_malicious: int) -> torch.Tensor:
    """Krum score of each set: sum of squared distances to its n - f - 2 closest others.

    As in Flower, at least one neighbour is used (``max(1, n - f - 2)``) so that small rounds
    still get a score; Krum's guarantee itself needs n >= 2f + 3.
    """
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    n = len(params_list)
    dist = pairwise_sq_distances(params_list)
    if n == 1:
        return torch.zeros(1, dtype=COMPUTE_DTYPE)
    num_closest = min(max(1, n - num_malicious - 2), n - 1)
    scores = torch.empty(n, dtype=COMPUTE_DTYPE)
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores[i] = torch.sort(others).values[:num_closest].sum()
    return scores


def _lexicographic_cmp(a: Params, b: Params, keys: Iterable[str]) -> int:
    for k in keys:
        x, y = a[k].reshape(-1), b[k].reshape(-1)
        diff = torch.nonzero(x != y)
        if diff.numel():
            i = int(diff[0, 0])
            return -1 if bool(x[i] < y[i]) else 1
    return 0


def krum_order(params_list: Sequence[Params], *, num_malicious: int) -> list[int]:
    """Indices from best (lowest score) to worst; exact ties are broken by content, not position,
    so the selection does not depend on the order the clients arrived in."""
    keys = _check_same_structure(params_list)
    scores = krum_scores(params_list, num_malicious=num_malicious).tolist()

    def cmp(i: int, j: int) -> int:
        if scores[i] != scores[j]:
            return -1 if scores[i] < scores[j] else 1
        return _lexicographic_cmp(params_list[i], params_list[j], keys)

    return sorted(range(len(params_list)), key=functools.cmp_to_key(cmp))


def krum_select(
    params_list: Sequence[Params],
    *,
    num_malicious: int,
    num_selected: int = 1,
    weights: Sequence[float] | None = None,
    like: Mapping[str, torch.Tensor] | None = None,
) -> Params:
    """Krum (``num_selected == 1``: the best-scored set itself) or multi-Krum (the mean of the
    ``num_selected`` best).

    Multi-Krum averages *uniformly* by default, as in Blanchard et al. (2017): weighting by
    self-reported ``num_examples`` would let a selected attacker claim a huge count. Pass
    ``weights`` to reproduce Flower's ``aggregate_krum(..., to_keep=m)``, which weights the kept
    sets by their example counts.
    """
    n = len(params_list)
    if not 1 <= num_selected <= n:
        raise ValueError(f"num_selected must be in [1, {n}], got {num_selected}")
    order = krum_order(params_list, num_malicious=num_malicious)
    chosen = order[:num_selected]
    like_ = _like_for(params_list, like)
    if num_selected == 1:
        best = params_list[chosen[0]]
        return {k: cast_like(to_compute(v), like_[k]) for k, v in best.items()}
    w = [1.0] * num_selected if weights is None else [float(weights[i]) for i in chosen]
    return weighted_mean([params_list[i] for i in chosen], w, like=like_)


# --- updates <-> params ---


def as_weights(update: Update, global_params: Params) -> Params:
    """The update as full weights: WEIGHTS as sent, DELTA added to the global in float64."""
    if update.kind == ParamKind.WEIGHTS:
        return dict(update.params)
    return {k: to_compute(global_params[k]) + to_compute(d) for k, d in update.params.items()}


def deltas(updates: Sequence[Update], global_params: Params) -> list[Params]:
    """Each update as a float64 delta (weights - global) over the keys it carries."""
    out: list[Params] = []
    for u in updates:
        if u.kind == ParamKind.DELTA:
            out.append({k: to_compute(d) for k, d in u.params.items()})
        else:
            out.append(
                {k: to_compute(w) - to_compute(global_params[k]) for k, w in u.params.items()}
            )
    return out


def merge(global_params: Params, partial: Mapping[str, torch.Tensor]) -> Params:
    """Global params with the keys in ``partial`` replaced; keeps the global's key order."""
    unknown = set(partial) - set(global_params)
    if unknown:
        raise ValueError(f"keys not in the global params: {sorted(unknown)[:5]}")
    return {k: partial.get(k, v) for k, v in global_params.items()}


def prepare_updates(
    global_params: Params, updates: Sequence[Update], expected_keys: frozenset[str] | None
) -> list[Update]:
    """Validate updates against the global params and sort them by site.

    Sorting makes every strategy bit-for-bit independent of arrival order; duplicate sites
    would make that order ambiguous (and double-count a site), so they are rejected.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = set(global_params) if expected_keys is None else set(expected_keys)
    sites = [u.site for u in updates]
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites among updates: {sorted(sites)}")
    for u in updates:
        if set(u.params) != keys:
            missing, extra = sorted(keys - set(u.params)), sorted(set(u.params) - keys)
            raise ValueError(
                f"update from {u.site!r} has wrong keys: missing {missing[:5]}, extra {extra[:5]}"
            )
        for k, t in u.params.items():
            if t.shape != global_params[k].shape:
                raise ValueError(
                    f"update from {u.site!r}: {k!r} has shape {tuple(t.shape)}, "
                    f"expected {tuple(global_params[k].shape)}"
                )
        if u.num_examples < 0:
            raise ValueError(f"update from {u.site!r} has negative num_examples")
    return sorted(updates, key=lambda u: u.site)


def fedavg_aggregate(
    global_params: Params, updates: Sequence[Update], expected_keys: frozenset[str] | None
) -> Params:
    """Example-weighted mean of the uploaded keys; keys not uploaded keep the global value."""
    ups = prepare_updates(global_params, updates, expected_keys)
    mean = weighted_mean(
        [as_weights(u, global_params) for u in ups],
        [u.num_examples for u in ups],
        like=global_params,
    )
    return merge(global_params, mean)
