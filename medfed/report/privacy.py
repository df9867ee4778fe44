"""The privacy blocks of ``results.json`` (``meta.privacy`` and the top-level ``privacy``), typed.

Written by :mod:`medfed.study.privacy`. Studies from before DP have neither block and read as a
study without DP; once a block is there it is validated like the rest of the file, so a drifted
field fails naming itself instead of printing a blank ε next to a privacy claim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medfed.report.fields import RESULTS, fail, get, num, text, texts


@dataclass(frozen=True)
class Spent:
    """What one run spent, as its accountant recorded after its last round."""

    mode: str
    delta: float | None
    accountant: str
    epsilon: float | None
    """The most any site spent (the guarantee is the weakest site's); ``None``: unbounded."""
    epsilons: Mapping[str, float | None]
    noise_multiplier: Mapping[str, float]
    """σ per site in the last round (dpsgd calibrates it per site, from the site's size)."""
    clip: float | None


@dataclass(frozen=True)
class NetworkPrivacy:
    dp: Mapping[str, Any] | None
    """The DP settings the network trained with; ``None``: no DP."""
    spent: Mapping[str, Spent | None]
    """Per paradigm key (``local:<site>`` for a local-only model)."""
    stopped: Mapping[str, str] = field(default_factory=dict)
    """Per paradigm key: why the run ended before its last round (a privacy budget ran out)."""

    @property
    def enabled(self) -> bool:
        return self.dp is not None

    @property
    def mode(self) -> str | None:
        return None if self.dp is None else str(self.dp.get("mode"))

    @property
    def budget(self) -> float | None:
        """The ε a site may not pass: ``max_epsilon``, else ``target_epsilon``."""
        if self.dp is None:
            return None
        for key in ("max_epsilon", "target_epsilon"):
            value = self.dp.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None


@dataclass(frozen=True)
class Drop:
    """One metric with and without DP; ``drop`` = without − with (positive: DP cost that much)."""

    without_dp: float | None
    with_dp: float | None
    drop: float | None
    relative_pct: float | None


@dataclass(frozen=True)
class ParadigmCost:
    paradigm: str
    mode: str | None
    epsilon: float | None
    delta: float | None
    noise_multiplier: Mapping[str, float]
    clip: float | None
    stopped: str | None
    splits: Mapping[str, Mapping[str, Drop]]
    """Split -> metric -> drop."""


@dataclass(frozen=True)
class Cost:
    """A DP network against its twin: the same model trained without DP in the same study."""

    network: str
    twin: str
    metrics: tuple[str, ...]
    paradigms: tuple[ParadigmCost, ...]


@dataclass(frozen=True)
class StudyPrivacy:
    networks: Mapping[str, NetworkPrivacy] = field(default_factory=dict)
    costs: tuple[Cost, ...] = ()

    @property
    def enabled(self) -> bool:
        """Whether any network trained with DP: the report's Privacy section depends on it."""
        return any(n.enabled for n in self.networks.values())

    def of(self, network: str) -> NetworkPrivacy | None:
        info = self.networks.get(network)
        return info if info is not None and info.enabled else None

    def cost(self, network: str) -> Cost | None:
        return next((c for c in self.costs if c.network == network), None)


def _mapping(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise fail(RESULTS, where, "not a mapping:")
    return obj


def _numbers(obj: Any, where: str, *, nulls: bool) -> dict[str, float | None]:
    """A ``{name: number}`` mapping (``null`` allowed where ``nulls``); NaN reads as null."""
    out: dict[str, float | None] = {}
    for key in _mapping(obj, where):
        value = num(obj, key, where)
        if value is None and not nulls:
            raise fail(RESULTS, f"{where}.{key}", "null where a number is needed:")
        out[str(key)] = value
    return out


def _spent(obj: Any, where: str) -> Spent | None:
    if obj is None:
        return None
    sigma = _numbers(get(obj, "noise_multiplier", where), f"{where}.noise_multiplier", nulls=False)
    return Spent(
        mode=text(obj, "mode", where),
        delta=num(obj, "delta", where),
        accountant=text(obj, "accountant", where),
        epsilon=num(obj, "max_epsilon", where),
        epsilons=_numbers(get(obj, "epsilon", where), f"{where}.epsilon", nulls=True),
        noise_multiplier={k: v for k, v in sigma.items() if v is not None},
        clip=num(obj, "clip", where),
    )


def _network(obj: Any, where: str) -> NetworkPrivacy:
    dp = get(obj, "dp", where)
    if dp is not None:
        _mapping(dp, f"{where}.dp")
    spent = _mapping(get(obj, "spent", where), f"{where}.spent")
    stopped = _mapping(obj.get("stopped", {}), f"{where}.stopped")
    return NetworkPrivacy(
        dp=dp,
        spent={str(k): _spent(v, f"{where}.spent.{k}") for k, v in spent.items()},
        stopped={str(k): text(stopped, k, f"{where}.stopped") for k in stopped},
    )


def _drop(obj: Any, where: str) -> Drop:
    return Drop(
        without_dp=num(obj, "without_dp", where),
        with_dp=num(obj, "with_dp", where),
        drop=num(obj, "drop", where),
        relative_pct=num(obj, "relative_drop_pct", where),
    )


def _paradigm(key: str, obj: Any, where: str, metrics: tuple[str, ...]) -> ParadigmCost:
    splits = _mapping(get(obj, "splits", where), f"{where}.splits")
    sigma = obj.get("noise_multiplier") if isinstance(obj, Mapping) else None
    mode = get(obj, "mode", where)
    stopped = get(obj, "stopped", where)
    return ParadigmCost(
        paradigm=key,
        mode=None if mode is None else text(obj, "mode", where),
        epsilon=num(obj, "epsilon", where),
        delta=num(obj, "delta", where),
        noise_multiplier={}
        if sigma is None
        else {
            k: v
            for k, v in _numbers(sigma, f"{where}.noise_multiplier", nulls=True).items()
            if v is not None
        },  # fmt: skip
        clip=num(obj, "clip", where),
        stopped=None if stopped is None else text(obj, "stopped", where),
        splits={
            str(s): {
                m: _drop(get(by_m, m, f"{where}.splits.{s}"), f"{where}.splits.{s}.{m}")
                for m in metrics
            }
            for s, by_m in splits.items()
        },
    )


def _cost(network: str, obj: Any, where: str) -> Cost:
    metrics = texts(obj, "metrics", where)
    paradigms = _mapping(get(obj, "paradigms", where), f"{where}.paradigms")
    return Cost(
        network=network,
        twin=text(obj, "twin", where),
        metrics=metrics,
        paradigms=tuple(
            _paradigm(str(k), v, f"{where}.paradigms.{k}", metrics) for k, v in paradigms.items()
        ),
    )


def read_privacy(raw: Mapping[str, Any], networks: tuple[str, ...]) -> StudyPrivacy:
    """Both privacy blocks; a study written before DP (no ``meta.privacy``) has none."""
    meta = raw.get("meta")
    if not isinstance(meta, Mapping) or "privacy" not in meta:
        return StudyPrivacy()
    by_net = _mapping(meta["privacy"], "meta.privacy")
    info = {n: _network(by_net[n], f"meta.privacy.{n}") for n in networks if n in by_net}
    costs_raw = _mapping(raw.get("privacy", {}), "privacy")
    costs = tuple(_cost(str(n), c, f"privacy.{n}") for n, c in costs_raw.items())
    for c in costs:
        if c.network not in info or c.twin not in networks:
            raise fail(RESULTS, f"privacy.{c.network}", "names a network the study does not have:")
    return StudyPrivacy(networks=info, costs=costs)
