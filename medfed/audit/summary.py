"""What a ledger says per round, for ``medfed ledger show`` and the report (no checks here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from medfed.audit.ledger import Entry, EntryKind


@dataclass(frozen=True)
class SiteRow:
    site: str
    status: str  # "included", or "rejected: why"
    digest: str | None  # None: the site sent nothing usable (failed, refused)
    num_examples: int | None
    epsilon: float | None


@dataclass(frozen=True)
class HandoverRow:
    """One peer-to-peer entry as its site signed it: a cyclic hop or a gossip step."""

    site: str
    position: int  # cyclic: the hop's place in the cycle; gossip: the step index
    received: str  # cyclic: the sender ("initial model" at the start); gossip: merged peers@version
    passed_to: str | None  # cyclic: the receiver (None at the cycle's end); gossip: None
    start_digest: str  # the model it trained from (gossip: its own, before merging)
    digest: str  # the model it produced
    version: int | None  # gossip: the site's version after the step


@dataclass(frozen=True)
class RoundRow:
    round: int
    strategy: str
    aggregate_digest: str  # peer-to-peer: the consensus; one-shot: the distilled student
    sites: tuple[SiteRow, ...]
    superseded: bool = False  # recorded by an attempt that crashed; the round was run again
    topology: str = "client-server"
    handovers: tuple[HandoverRow, ...] = ()


def _handover(d: dict[str, object]) -> HandoverRow | None:
    topology = d.get("topology")
    if topology == "cyclic":
        sender = d.get("sender")
        return HandoverRow(
            str(d["site"]),
            int(d["hop"]),  # type: ignore[call-overload]
            "initial model" if sender is None else str(sender),
            None if d.get("receiver") is None else str(d["receiver"]),
            str(d.get("start_digest")),
            str(d.get("digest")),
            None,
        )
    if topology == "gossip":
        merged = d.get("merged") or []
        return HandoverRow(
            str(d["site"]),
            int(d["step"]),  # type: ignore[call-overload]
            ", ".join(f"{m['site']} v{m['version']}" for m in merged) or "nothing new",  # type: ignore[attr-defined]
            None,
            str(d.get("from_digest")),
            str(d.get("digest")),
            int(d["version"]),  # type: ignore[call-overload]
        )
    return None


def round_rows(entries: Sequence[Entry]) -> list[RoundRow]:
    rows: list[RoundRow] = []
    pending: dict[str, dict[str, object]] = {}
    handovers: list[HandoverRow] = []
    for e in entries:
        try:
            d = e.data
        except ValueError:
            continue
        if e.kind == EntryKind.UPDATE:
            h = _handover(d)
            if h is not None:
                handovers.append(h)
            if e.signer in pending:  # a gossip site that stepped twice: its latest model, all work
                before = int(pending[e.signer].get("num_examples", 0))  # type: ignore[call-overload]
                d = d | {"num_examples": before + int(d.get("num_examples", 0))}
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
                    topology=str(d.get("topology", "client-server")),
                    handovers=tuple(handovers),
                )
            )
            pending, handovers = {}, []
        elif e.kind == EntryKind.RESUME:
            f = int(d.get("from_round", -1))
            rows = [replace(r, superseded=r.superseded or r.round > f) for r in rows]
            pending, handovers = {}, []
    return rows
