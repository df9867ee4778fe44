"""Privacy accounting through Opacus' accountants, per site, across rounds.

A site's privacy loss is a list of Gaussian-mechanism events ``(noise_multiplier, sample_rate,
steps)``, exactly Opacus' accountant history; ε at δ is whatever Opacus' RDP or PRV accountant says
for that history. medfed adds only the bookkeeping: who spent what, when, and a JSON form that goes
into checkpoints so a resumed run keeps counting from where it stopped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medfed.types import StrEnum

Event = tuple[float, float, int]
"""(noise multiplier, sample rate, steps): one run of a (subsampled) Gaussian mechanism."""


class AccountantKind(StrEnum):
    RDP = "rdp"
    PRV = "prv"


def _accountant(kind: AccountantKind, history: Sequence[Event]) -> Any:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=str(kind))
    acc.history = [(float(z), float(q), int(s)) for z, q, s in history]
    return acc


def epsilon(history: Sequence[Event], *, delta: float, kind: AccountantKind) -> float:
    """ε at ``delta`` after ``history``; 0 before any event, inf when a step had no noise."""
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    with warnings.catch_warnings():
        # PRV at sample rate 1 takes log(0) on a branch it then discards; RDP notes when its
        # best order is the largest it tries (a looser bound, never an optimistic one).
        warnings.simplefilter("ignore")
        return float(_accountant(kind, history).get_epsilon(delta))


def calibrate(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: AccountantKind,
) -> float:
    """The noise multiplier that spends ``target_epsilon`` in ``steps`` steps (Opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=max(1, steps),
                accountant=str(kind),
                epsilon_tolerance=0.01,
            )
        )


@dataclass
class PrivacySpend:
    """Per-site accountant histories for one run; the server's record of ε spent."""

    delta: float
    kind: AccountantKind
    history: dict[str, list[Event]] = field(default_factory=dict)

    def record(self, site: str, event: Event) -> None:
        z, q, steps = event
        if steps <= 0:
            return
        events = self.history.setdefault(site, [])
        # Consecutive identical mechanisms merge into one entry, as Opacus' own accountants do.
        if events and events[-1][:2] == (z, q):
            events[-1] = (z, q, events[-1][2] + steps)
        else:
            events.append((float(z), float(q), int(steps)))

    def epsilon(self, site: str, *, extra: Iterable[Event] = ()) -> float:
        return epsilon([*self.history.get(site, []), *extra], delta=self.delta, kind=self.kind)

    def epsilons(self, sites: Iterable[str]) -> dict[str, float]:
        return {s: self.epsilon(s) for s in sites}

    def to_json(self) -> dict[str, object]:
        return {
            "delta": self.delta,
            "accountant": str(self.kind),
            "history": {s: [list(e) for e in ev] for s, ev in self.history.items()},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> PrivacySpend:
        hist = raw.get("history", {})
        assert isinstance(hist, Mapping)
        return cls(
            delta=float(raw["delta"]),  # type: ignore[arg-type]
            kind=AccountantKind(str(raw["accountant"])),
            history={
                str(s): [(float(z), float(q), int(n)) for z, q, n in ev] for s, ev in hist.items()
            },
        )
