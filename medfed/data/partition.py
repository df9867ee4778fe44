"""Simulated federations: split one pooled dataset into sites, as pure functions of (data, seed).

Real multi-site data is scarce, so studies also carve a pooled public dataset into sites with a
controlled kind and amount of heterogeneity: none (IID), label skew (Dirichlet over classes),
quantity skew (Dirichlet over sizes), or the natural split by a metadata column (scanner, hospital).
Every function returns sorted int64 index arrays that together cover ``range(n)`` exactly once, so
a partition can be applied to any array aligned with the labels and checked mechanically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medfed.types import StrEnum

MAX_ATTEMPTS = 1000
"""Dirichlet draws tried before a label-skew request is declared infeasible (each is O(classes x sites))."""


class PartitionKind(StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    QUANTITY = "quantity"
    COLUMN = "column"


def iid_partition(n: int, *, num_sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal into ``num_sites`` sites whose sizes differ by at most one.

    The homogeneous baseline: any gap between federated and centralised training measured on it is
    the cost of federation itself, not of heterogeneity.
    """
    _check_sites(n, num_sites=num_sites, min_size=1)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_sites)]


def dirichlet_partition(
    labels: np.ndarray, *, num_sites: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label skew: each class is spread over the sites in proportions drawn from Dir(alpha).

    This is the scheme of Hsu et al. (2019) as implemented by NIID-Bench (Li et al., 2022) and
    FedLab's ``hetero_dir_partition``, so results compare with the literature: small ``alpha``
    concentrates each class on few sites, large ``alpha`` tends to IID. As there, a site that
    already holds ``n / num_sites`` cases receives nothing more, which keeps site *sizes* roughly
    balanced so that this partition isolates label skew (quantity skew is ``quantity_partition``).
    Draws are repeated (deterministically, from the one seeded generator) until every site holds
    at least ``min_size`` cases; after ``MAX_ATTEMPTS`` failures the request is judged infeasible.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    n = len(labels)
    _check_sites(n, num_sites=num_sites, min_size=min_size)
    _check_alpha(alpha)
    _, class_of = np.unique(labels, return_inverse=True)
    class_sizes = np.bincount(class_of)
    cap = n / num_sites
    rng = np.random.default_rng(seed)
    for _ in range(MAX_ATTEMPTS):
        counts = np.zeros((len(class_sizes), num_sites), dtype=np.int64)
        sizes = np.zeros(num_sites, dtype=np.int64)
        draws = rng.dirichlet(np.full(num_sites, alpha), size=len(class_sizes))
        for c, n_c in enumerate(class_sizes):
            p = draws[c] * (sizes < cap)
            if not p.sum() > 0:  # every open site drew an underflowed zero: share them evenly
                p = (sizes < cap).astype(float)
            counts[c] = _split_counts(p / p.sum(), int(n_c))
            sizes += counts[c]
        if sizes.min() >= min_size:
            break
    else:
        raise ValueError(
            f"could not give each of {num_sites} sites >= {min_size} cases with label skew "
            f"alpha={alpha} over {len(class_sizes)} classes and {n} cases in {MAX_ATTEMPTS} "
            "draws: at small alpha each class lands on few sites, so with few classes most sites "
            "stay empty; raise alpha, lower num_sites or min_size"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in range(len(class_sizes)):
        idx = rng.permutation(np.flatnonzero(class_of == c))
        for site, chunk in enumerate(np.split(idx, np.cumsum(counts[c])[:-1])):
            parts[site].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def quantity_partition(
    n: int, *, num_sites: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew: site sizes follow Dir(alpha) * n, labels are IID across sites.

    Models federations of one large hospital and several small ones. ``min_size`` is granted up
    front and the rest is shared in Dir(alpha) proportions, instead of redrawing until every site
    is large enough: at small alpha most Dirichlet draws leave some site near-empty (for 10 sites
    at alpha=0.1 roughly 999 in 1000), so rejection would almost always fail. For
    ``min_size * num_sites << n`` the two schemes agree closely.
    """
    _check_sites(n, num_sites=num_sites, min_size=min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    spare = n - min_size * num_sites
    sizes = min_size + _split_counts(rng.dirichlet(np.full(num_sites, alpha)), spare)
    perm = rng.permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def column_partition(values: Sequence[str]) -> dict[str, np.ndarray]:
    """The natural federation: one site per distinct metadata value, in sorted order of values.

    Splitting by scanner model, vendor or hospital reproduces the feature (acquisition) shift that
    real federations have and synthetic skews do not. Missing or blank values are refused rather
    than silently pooled into a site of their own: how to treat unknown provenance is a study
    decision.
    """
    values = list(values)
    if not values:
        raise ValueError("column_partition needs at least one case, got an empty column")
    bad = sorted({repr(v) for v in values if not isinstance(v, str) or not v.strip()})
    if bad:
        raise ValueError(
            f"column values must be non-blank strings, found {', '.join(bad[:5])}: map missing "
            "metadata to an explicit value (e.g. 'unknown') or drop those cases first"
        )
    names, site_of = np.unique(np.asarray(values, dtype=object), return_inverse=True)
    order = np.argsort(site_of, kind="stable")
    bounds = np.cumsum(np.bincount(site_of, minlength=len(names)))[:-1]
    return {
        str(name): chunk.astype(np.int64)
        for name, chunk in zip(names, np.split(order, bounds), strict=True)
    }


def partition(
    kind: PartitionKind | str,
    *,
    labels: np.ndarray,
    num_sites: int | None = None,
    alpha: float | None = None,
    column: Sequence[str] | None = None,
    seed: int = 0,
    min_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Dispatch on ``kind`` and name the sites: ``site1``..``siteK``, or the column's values.

    Config files reach this point, so an argument that the kind does not use is an error, not
    ignored: ``alpha`` given for an IID split is almost certainly a mistyped ``kind``.
    ``min_size`` (default 1) applies to the Dirichlet and quantity kinds only.
    """
    try:
        kind = PartitionKind(kind)
    except ValueError:
        choices = ", ".join(k.value for k in PartitionKind)
        raise ValueError(f"unknown partition kind {kind!r}; choose one of {choices}") from None
    labels = np.asarray(labels)
    given = {"num_sites": num_sites, "alpha": alpha, "column": column, "min_size": min_size}
    used = {
        PartitionKind.IID: {"num_sites"},
        PartitionKind.DIRICHLET: {"num_sites", "alpha", "min_size"},
        PartitionKind.QUANTITY: {"num_sites", "alpha", "min_size"},
        PartitionKind.COLUMN: {"column"},
    }[kind]
    required = used - {"min_size"}
    missing = sorted(k for k in required if given[k] is None)
    if missing:
        raise ValueError(f"partition kind {kind.value!r} requires {', '.join(missing)}")
    irrelevant = sorted(k for k, v in given.items() if v is not None and k not in used)
    if irrelevant:
        raise ValueError(f"partition kind {kind.value!r} does not use {', '.join(irrelevant)}")

    if kind is PartitionKind.COLUMN:
        assert column is not None
        if len(column) != len(labels):
            raise ValueError(f"column has {len(column)} values but there are {len(labels)} labels")
        return column_partition(column)
    assert num_sites is not None
    if kind is PartitionKind.IID:
        parts = iid_partition(len(labels), num_sites=num_sites, seed=seed)
    elif kind is PartitionKind.DIRICHLET:
        assert alpha is not None
        parts = dirichlet_partition(
            labels,
            num_sites=num_sites,
            alpha=alpha,
            seed=seed,
            min_size=1 if min_size is None else min_size,
        )
    else:
        assert alpha is not None
        parts = quantity_partition(
            len(labels),
            num_sites=num_sites,
            alpha=alpha,
            seed=seed,
            min_size=1 if min_size is None else min_size,
        )
    return {f"site{i + 1}": part for i, part in enumerate(parts)}


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label distribution and the pooled one.

    0 means every site sees the pooled class mix; 1 is the most a site can differ. Sites are
    weighted equally, not by size, because each is one participant whose local optimum pulls on
    the global model; the pooled distribution is over all ``labels``.
    """
    labels = np.asarray(labels)
    if not parts:
        raise ValueError("label_skew needs at least one site")
    _, class_of = np.unique(labels, return_inverse=True)
    n_classes = int(class_of.max()) + 1 if len(labels) else 0
    pooled = np.bincount(class_of, minlength=n_classes) / max(len(labels), 1)
    distances = []
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise ValueError(f"site {i} is empty: its label distribution is undefined")
        site = np.bincount(class_of[np.asarray(part)], minlength=n_classes) / len(part)
        distances.append(0.5 * float(np.abs(site - pooled).sum()))
    return float(np.mean(distances))


def _split_counts(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, cut at floor(cumsum(p) * total) as in NIID-Bench."""
    cuts = np.clip(np.floor(np.cumsum(proportions)[:-1] * total), 0, total).astype(np.int64)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def _check_sites(n: int, *, num_sites: int, min_size: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1 (an empty site cannot train), got {min_size}")
    if num_sites * min_size > n:
        raise ValueError(
            f"cannot give {num_sites} sites >= {min_size} cases each from only {n} cases"
        )


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite positive concentration, got {alpha}")


def partition_by_group(
    kind: PartitionKind | str,
    *,
    labels: np.ndarray,
    groups: Sequence[str],
    num_sites: int | None = None,
    alpha: float | None = None,
    column: Sequence[str] | None = None,
    seed: int = 0,
    min_size: int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`partition` over patients instead of cases: a patient's cases stay at one site.

    A simulated federation that puts one patient's images at two hospitals is not a federation a
    real one resembles, and it leaks across sites. Each patient counts once, with the most frequent
    label (and column value) among its cases, ties to the smallest; ``min_size`` then counts
    patients. With one case per patient this is exactly :func:`partition`.
    """
    labels = np.asarray(labels)
    keys = np.asarray([str(g) for g in groups])
    if len(keys) != len(labels):
        raise ValueError(f"groups has {len(keys)} values but there are {len(labels)} labels")
    # Groups numbered by first appearance, so one case per patient reproduces partition() exactly.
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group_of = rank[inverse.ravel()]
    order = np.argsort(group_of, kind="stable")
    bounds = np.searchsorted(group_of[order], np.arange(len(first) + 1))
    members = [order[bounds[g] : bounds[g + 1]] for g in range(len(first))]

    def mode(values: np.ndarray) -> Any:
        vals, counts = np.unique(values, return_counts=True)
        return vals[int(np.argmax(counts))]  # np.unique sorts: ties go to the smallest

    group_labels = np.array([mode(labels[m]) for m in members])
    group_column = None
    if column is not None:
        if len(column) != len(labels):
            raise ValueError(f"column has {len(column)} values but there are {len(labels)} labels")
        col = np.asarray([str(v) for v in column])
        group_column = [str(mode(col[m])) for m in members]
    parts = partition(
        kind,
        labels=group_labels,
        num_sites=num_sites,
        alpha=alpha,
        column=group_column,
        seed=seed,
        min_size=min_size,
    )
    return {
        name: np.sort(np.concatenate([members[g] for g in idx])).astype(np.int64)
        if len(idx)
        else np.zeros(0, dtype=np.int64)
        for name, idx in parts.items()
    }
