"""What a ledger says per round, for ``medfed ledger show`` and the report (no checks here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medfed.audit.ledger import Entry, EntryKind


@dataclass(frozen=True)
class SiteRow:
    site: str
    status: str  # "included", or "rejected: why"
    digest: str | None  # None: the site sent nothing usable (failed, refused)
    num_examples: int | None
    epsilon: float | None


@dataclass(frozen=True)
class RoundRow:
    round: int
    strategy: str
    aggregate_digest: str
    sites: tuple[SiteRow, ...]
    superseded: bool = False  # recorded by an attempt that crashed; the round was run again


def round_rows(entries: Sequence[Entry]) -> list[RoundRow]:
    rows: list[RoundRow] = []
    pending: dict[str, dict[str, object]] = {}
    for e in entries:
        try:
            d = e.data
        except ValueError:
            continue
        if e.kind == EntryKind.UPDATE:
            pending[e.signer] = d
        elif e.kind == EntryKind.ROUND:
            eps = d.get("epsilon") or {}
            rejected = dict(d.get("rejected") or {})
            sites = []
            for site in sorted(set(pending) | set(rejected)):
                u = pending.get(site, {})
                status = (
                    "included"
                    if site in d.get("included", [])
                    else f"rejected: {rejected.get(site, '?')}"
                )
                e_site = eps.get(site)
                sites.append(
                    SiteRow(
                        site,
                        status,
                        None if not u else str(u.get("digest")),
                        None if not u else int(u.get("num_examples", 0)),  # type: ignore[call-overload]
                        None if e_site is None else float(e_site),
                    )
                )
            rows.append(
                RoundRow(
                    int(d["round"]),
                    str(d.get("strategy", "")),
                    str(d.get("aggregate_digest", "")),
                    tuple(sites),
                )
            )
            pending = {}
        elif e.kind == EntryKind.RESUME:
            f = int(d.get("from_round", -1))
            rows = [
                RoundRow(
                    r.round, r.strategy, r.aggregate_digest, r.sites, r.superseded or r.round > f
                )
                for r in rows
            ]
            pending = {}
    return rows
