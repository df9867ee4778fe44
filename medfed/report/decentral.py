"""The ``peer`` and ``one_shot`` blocks of ``results.json``, typed (written by
:mod:`medfed.study.decentral`).

Studies without cyclic, gossip or one-shot runs have neither block and read as empty. Once a
block is there it is validated like the rest of the file, so a drifted field fails naming itself.
The one-shot synthesis grid is the block's one soft input: a missing or unreadable PNG becomes a
placeholder that says why, as a segmentation study's overlays do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.report.fields import RESULTS, count, fail, get, num, text
from medfed.study.decentral import OWN_SITE, POINT_METRICS, SPREAD_STATS, Block, Row

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Point:
    """AUC and accuracy of one model on one split; ``None`` where undefined."""

    auc: float | None
    accuracy: float | None

    def value(self, metric: str) -> float | None:
        return self.auc if metric == "auc" else self.accuracy


NO_POINT = Point(None, None)


@dataclass(frozen=True)
class ModelPoints:
    """One model (a site's own, or the consensus) on internal, own-site and external validation."""

    splits: Mapping[str, Point]

    def at(self, split: str) -> Point:
        return self.splits.get(split, NO_POINT)


@dataclass(frozen=True)
class PeerRun:
    network: str
    paradigm: str
    rounds: int
    bytes_per_site: Mapping[str, int]
    consensus: ModelPoints
    site_models: Mapping[str, ModelPoints]
    spread: Mapping[str, Mapping[str, Mapping[str, float | None]]]
    """Split -> metric -> min/max/mean/std over the site models."""
    consensus_minus_mean: Mapping[str, Mapping[str, float | None]]


@dataclass(frozen=True)
class ShotRow:
    """One training of the one-shot comparison, as its run's history recorded it."""

    transfers_per_site: int | None
    """``None``: centralized (the data was pooled)."""
    bytes_per_site: int | None
    rounds_done: int | None
    internal: Point
    external: Point | None


@dataclass(frozen=True)
class OneShot:
    network: str
    rows: Mapping[str, ShotRow | None]
    """Keyed by :class:`~medfed.study.decentral.Row`; ``None`` where the study lacks the run."""
    teachers: Mapping[str, str]
    best_epoch: int | None
    distill_epochs: int
    figure: str | None
    png: bytes | None
    problem: str = ""
    """Why ``png`` is ``None``, for the placeholder that stands in for the grid."""


@dataclass(frozen=True)
class Decentral:
    peer: tuple[PeerRun, ...] = ()
    one_shot: tuple[OneShot, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.peer or self.one_shot)


def _mapping(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise fail(RESULTS, where, "not a mapping:")
    return obj


def _point(obj: Any, where: str) -> Point:
    return Point(auc=num(obj, "auc", where), accuracy=num(obj, "accuracy", where))


def _model(obj: Any, where: str) -> ModelPoints:
    _mapping(obj, where)
    return ModelPoints(
        {s: _point(obj[s], f"{where}.{s}") for s in ("internal", OWN_SITE, "external") if s in obj}
    )


def _peer(network: str, paradigm: str, obj: Any, where: str) -> PeerRun:
    sites = _mapping(get(obj, "site_models", where), f"{where}.site_models")
    spread = _mapping(get(obj, "spread", where), f"{where}.spread")
    diff = _mapping(get(obj, "consensus_minus_mean", where), f"{where}.consensus_minus_mean")
    moved = _mapping(get(obj, "bytes_per_site", where), f"{where}.bytes_per_site")
    return PeerRun(
        network=network,
        paradigm=paradigm,
        rounds=count(obj, "rounds", where),
        bytes_per_site={str(s): count(moved, s, f"{where}.bytes_per_site") for s in moved},
        consensus=_model(get(obj, "consensus", where), f"{where}.consensus"),
        site_models={str(s): _model(m, f"{where}.site_models.{s}") for s, m in sites.items()},
        spread={
            str(split): {
                m: {
                    stat: num(get(by_m, m, f"{where}.spread.{split}"), stat, f"{where}.{split}.{m}")
                    for stat in SPREAD_STATS
                }
                for m in POINT_METRICS
            }
            for split, by_m in spread.items()
        },
        consensus_minus_mean={
            str(split): {
                m: num(by_m, m, f"{where}.consensus_minus_mean.{split}") for m in POINT_METRICS
            }
            for split, by_m in diff.items()
        },
    )


def _row(obj: Any, where: str) -> ShotRow | None:
    if obj is None:
        return None
    transfers = num(obj, "transfers_per_site", where)
    nbytes = num(obj, "bytes_per_site", where)
    rounds = num(obj, "rounds_done", where)
    ext = get(obj, "external", where)
    return ShotRow(
        transfers_per_site=None if transfers is None else int(transfers),
        bytes_per_site=None if nbytes is None else int(nbytes),
        rounds_done=None if rounds is None else int(rounds),
        internal=_point(get(obj, "internal", where), f"{where}.internal"),
        external=None if ext is None else _point(ext, f"{where}.external"),
    )


def _figure(directory: Path, rel: str | None, where: str) -> tuple[bytes | None, str]:
    if rel is None:
        return None, "the one-shot run recorded no synthesis grid"
    path = (directory / rel).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise fail(RESULTS, where, "synthesis grid path outside the study directory:")
    if not path.is_file():
        return None, f"synthesis grid not found: {rel}"
    png = path.read_bytes()
    if not png.startswith(PNG_SIGNATURE) or len(png) < 24:
        return None, f"synthesis grid is not a PNG file: {rel}"
    return png, ""


def _one_shot(network: str, obj: Any, where: str, directory: Path) -> OneShot:
    rows = _mapping(get(obj, "rows", where), f"{where}.rows")
    figure = get(obj, "synthesis_figure", where)
    if figure is not None:
        figure = text(obj, "synthesis_figure", where)
    png, problem = _figure(directory, figure, f"{where}.synthesis_figure")
    teachers = _mapping(get(obj, "teachers", where), f"{where}.teachers")
    best = num(obj, "best_epoch", where)
    return OneShot(
        network=network,
        rows={str(r): _row(get(rows, str(r), f"{where}.rows"), f"{where}.rows.{r}") for r in Row},
        teachers={str(s): text(teachers, s, f"{where}.teachers") for s in teachers},
        best_epoch=None if best is None else int(best),
        distill_epochs=count(obj, "distill_epochs", where),
        figure=figure,
        png=png,
        problem=problem,
    )


def read_decentral(raw: Mapping[str, Any], networks: tuple[str, ...], directory: Path) -> Decentral:
    """Both blocks, in the study's network order; a block naming another network is an error."""
    peer_raw = _mapping(raw.get(str(Block.PEER), {}), str(Block.PEER))
    shot_raw = _mapping(raw.get(str(Block.ONE_SHOT), {}), str(Block.ONE_SHOT))
    for name, block in ((Block.PEER, peer_raw), (Block.ONE_SHOT, shot_raw)):
        unknown = sorted(set(block) - set(networks))
        if unknown:
            raise fail(RESULTS, f"{name}.{unknown[0]}", "names a network the study does not have:")
    peer = tuple(
        _peer(n, str(p), run, f"{Block.PEER}.{n}.{p}")
        for n in networks
        for p, run in _mapping(peer_raw.get(n, {}), f"{Block.PEER}.{n}").items()
    )
    one_shot = tuple(
        _one_shot(n, shot_raw[n], f"{Block.ONE_SHOT}.{n}", directory)
        for n in networks
        if n in shot_raw
    )
    return Decentral(peer=peer, one_shot=one_shot)
