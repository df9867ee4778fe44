"""The verifier's story checks for runs without a server in the loop (cyclic, gossip, one-shot).

Pure: fed the decoded bodies of a trusted chain in order by :mod:`medfed.audit.verify`, it follows
which model every site holds and says where an entry contradicts that (what the entries mean is
documented in :mod:`medfed.audit.p2p`):

* cyclic: every hop starts from exactly the model the previous recorded hop passed on, sent by
  that hop's site (the first from the run's initial model); in each cycle the hops follow the
  recorded visit order, each names the next site of that order as its receiver (at the cycle's
  end the next cycle's first site, none after the last cycle), and a site of the order without a
  hop is listed as rejected;
* gossip: a step starts from the stepping site's latest recorded (version, digest), every peer it
  merged is that peer's latest recorded (version, digest) -- a version or digest the chain never
  recorded is a fork -- its version goes up by one, step indices increase within their round's
  range, and the round's version vector is the one the steps add up to;
* one-shot: every upload says so, and the round entry carries the distillation settings.

A ``resume`` entry rolls the story back to what it was after the round the run resumed from.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medfed.audit.ledger import Issue
from medfed.types import Paradigm

Finding = tuple[Issue, str] | None


def _short(digest: Any) -> str:
    return f"{str(digest)[:12]}…" if digest else "none"


@dataclass
class _State:
    holder: str | None = None  # cyclic: who holds the travelling model
    digest: str | None = None  # cyclic: its digest
    hops: list[dict[str, Any]] = field(default_factory=list)  # cyclic: this round's hops
    handed: tuple[int, str] | None = None  # cyclic: (hop, receiver) handed to the next cycle
    models: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # gossip
    last_step: int = -1  # gossip


class Lineage:
    """Which model each site holds, as far as the chain has told so far."""

    def __init__(self, paradigm: Paradigm, sites: list[str], initial: str | None) -> None:
        self.paradigm, self.sites, self.initial = paradigm, sites, initial
        self.state = self._start()
        self.snapshots: dict[int, _State] = {}

    def _start(self) -> _State:
        return _State(digest=self.initial, models=dict.fromkeys(self.sites, (0, self.initial)))

    @classmethod
    def from_start(cls, start: Mapping[str, Any]) -> Lineage | None:
        """For a run-start body of a paradigm that has these checks; None for client-server."""
        name = start.get("paradigm")
        if name not in {Paradigm.CYCLIC, Paradigm.GOSSIP, Paradigm.ONE_SHOT}:
            return None
        sites = [str(s) for s in start["sites"]]
        initial = start.get("initial_digest")
        return cls(Paradigm(name), sites, None if initial is None else str(initial))

    @property
    def repeats(self) -> bool:
        """Whether a site may sign more than one entry in a round (a gossip site may step twice)."""
        return self.paradigm is Paradigm.GOSSIP

    def update(self, d: Mapping[str, Any]) -> Finding:
        if d.get("topology") != self.paradigm:
            return Issue.MALFORMED, f"a {d.get('topology')!r} update in a {self.paradigm} run"
        if self.paradigm is Paradigm.CYCLIC:
            return self._hop(d)
        if self.paradigm is Paradigm.GOSSIP:
            return self._step(d)
        return None

    def _hop(self, d: Mapping[str, Any]) -> Finding:
        s = self.state
        if d["sender"] != s.holder or d["start_digest"] != s.digest:
            return Issue.OUT_OF_ORDER, (
                f"hop of {d['site']!r} trained from model {_short(d['start_digest'])} sent by "
                f"{d['sender']!r}, but the chain's travelling model is {_short(s.digest)} held "
                f"by {s.holder!r} (a hop was dropped, reordered or forged)"
            )
        if s.hops and int(d["hop"]) <= int(s.hops[-1]["hop"]):
            return Issue.OUT_OF_ORDER, f"hop {d['hop']} after hop {s.hops[-1]['hop']}"
        s.holder, s.digest = str(d["site"]), str(d["digest"])
        s.hops.append(dict(d))
        return None

    def _step(self, d: Mapping[str, Any]) -> Finding:
        s, site, k = self.state, str(d["site"]), len(self.sites)
        step, r = int(d["step"]), int(d["round"])
        if step <= s.last_step or not r * k <= step < (r + 1) * k:
            return Issue.OUT_OF_ORDER, (
                f"step {step} of round {r} (after step {s.last_step}; round {r} has steps "
                f"{r * k}..{(r + 1) * k - 1})"
            )
        if site not in s.models:
            return Issue.MALFORMED, f"step by {site!r}, not a site of this run"
        if (int(d["from_version"]), d["from_digest"]) != s.models[site]:
            v, dig = s.models[site]
            return Issue.OUT_OF_ORDER, (
                f"{site!r} stepped from its version {d['from_version']} "
                f"({_short(d['from_digest'])}); the chain has it at version {v} ({_short(dig)})"
            )
        for m in d["merged"]:
            peer = str(m["site"])
            if peer == site or peer not in s.models:
                return Issue.MALFORMED, f"{site!r} merged {peer!r}, not a peer of this run"
            if (int(m["version"]), m["digest"]) != s.models[peer]:
                v, dig = s.models[peer]
                return Issue.OUT_OF_ORDER, (
                    f"{site!r} merged {peer!r} version {m['version']} ({_short(m['digest'])}), "
                    f"but the chain has {peer!r} at version {v} ({_short(dig)}): a fork"
                )
        if int(d["version"]) != int(d["from_version"]) + 1:
            return Issue.OUT_OF_ORDER, (
                f"{site!r} went from version {d['from_version']} to {d['version']}"
            )
        s.models[site] = (int(d["version"]), str(d["digest"]))
        s.last_step = step
        return None

    def round(self, d: Mapping[str, Any]) -> Finding:
        """The orchestrator's round entry against the entries of its round."""
        if d.get("topology") != self.paradigm:
            return Issue.MALFORMED, f"a {d.get('topology')!r} round in a {self.paradigm} run"
        r = int(d["round"])
        found: Finding = None
        if self.paradigm is Paradigm.CYCLIC:
            found = self._cycle(d)
        elif self.paradigm is Paradigm.GOSSIP:
            versions = {s: v for s, (v, _) in self.state.models.items()}
            if {str(k): int(v) for k, v in dict(d["versions"]).items()} != versions:
                found = (
                    Issue.OUT_OF_ORDER,
                    (
                        f"round {r} records versions {dict(d['versions'])}, its steps add up to "
                        f"{versions}"
                    ),
                )
        elif not isinstance(d.get("distill"), dict):
            found = Issue.MALFORMED, "a one-shot round without its distillation settings"
        if found is None:
            self.state.hops = []
            self.snapshots[r] = copy.deepcopy(self.state)
        return found

    def _cycle(self, d: Mapping[str, Any]) -> Finding:
        order = [str(s) for s in d["order"]]
        rejected = set(dict(d["rejected"]))
        if self.state.handed is not None and order and self.state.handed[1] != order[0]:
            i, to = self.state.handed
            return Issue.OUT_OF_ORDER, (
                f"the last cycle's hop {i} handed the model to {to!r}, but this cycle starts "
                f"at {order[0]!r}"
            )
        hopped, self.state.handed = set(), None
        for h in self.state.hops:
            i, site = int(h["hop"]), str(h["site"])
            if not 0 <= i < len(order) or order[i] != site:
                return Issue.OUT_OF_ORDER, (
                    f"hop {i} by {site!r} is not at that place of the cycle's order {order}"
                )
            if i + 1 == len(order):  # checked against the next cycle, or the run's end
                if h["receiver"] is not None:
                    self.state.handed = i, str(h["receiver"])
            elif h["receiver"] != order[i + 1]:
                return Issue.OUT_OF_ORDER, (
                    f"hop {i} by {site!r} names receiver {h['receiver']!r}; the order says "
                    f"{order[i + 1]!r}"
                )
            hopped.add(site)
        skipped = sorted(set(order) - hopped - rejected)
        if skipped:
            return Issue.OUT_OF_ORDER, (
                f"site(s) {skipped} of the cycle's order have neither a hop nor a rejection"
            )
        return None

    def end(self) -> Finding:
        """At the run's end: no hop may have handed the model to a cycle that never came."""
        if self.state.handed is not None:
            i, to = self.state.handed
            return Issue.OUT_OF_ORDER, (
                f"the last cycle's hop {i} handed the model to {to!r}, but the run ended"
            )
        return None

    def resume(self, from_round: int) -> None:
        """The story as it was after ``from_round`` (the start for -1)."""
        snap = self.snapshots.get(from_round)
        self.state = self._start() if snap is None else copy.deepcopy(snap)
        if self.paradigm is Paradigm.GOSSIP:
            self.state.last_step = (from_round + 1) * len(self.sites) - 1
