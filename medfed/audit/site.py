"""The site's half of the ledger: its key, its replica, and the receipts it signs.

A site signs a canonical statement of exactly what it sends (run, round, site, the update's
tensor digest, examples, metrics, the head of its replica) without the coordinator's help; the
statement travels with the update and becomes the site-signed ``update`` entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.audit.canonical import canonical_json, tensor_digest
from medfed.audit.keys import public_hex
from medfed.audit.ledger import (
    ChainStore,
    Entry,
    EntryKind,
    Issue,
    LedgerError,
    Pins,
    extend_replica,
    head_hash,
    sign_body,
)
from medfed.types import Update


def update_digest(update: Update) -> str:
    """The tensor digest of everything an update carries: its parameters and, under
    ``extras/<group>/<name>``, its extra groups (e.g. SCAFFOLD's control-variate delta)."""
    tensors = dict(update.params)
    for group, params in update.extras.items():
        tensors.update({f"extras/{group}/{k}": v for k, v in params.items()})
    return tensor_digest(tensors)


@dataclass(frozen=True)
class Receipt:
    """A site's signed statement of the update it sent; travels with the update."""

    site: str
    body: bytes
    signature: str

    def to_wire(self) -> dict[str, str]:
        return {"site": self.site, "body": self.body.decode("utf-8"), "signature": self.signature}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Receipt:
        return cls(str(d["site"]), str(d["body"]).encode("utf-8"), str(d["signature"]))


class SiteLedger:
    """What a site holds: its key and its replica. It signs its updates and checks every entry
    it is sent (the simulator runs one per site; a Flower SuperNode runs one for itself)."""

    def __init__(
        self,
        site: str,
        key: Ed25519PrivateKey,
        store: ChainStore,
        *,
        coordinator_key: str | None = None,
    ) -> None:
        self.site, self.key, self.store = site, key, store
        self.public = public_hex(key)
        self.coordinator_key = coordinator_key
        self._pins: Pins | None = None

    def receive(self, entries: Sequence[Entry]) -> int:
        added = extend_replica(
            self.store,
            entries,
            site=self.site,
            site_key=self.public,
            coordinator_key=self.coordinator_key,
            pins=self._pins,
        )
        if self._pins is None and len(self.store):  # parsed once: delivery runs every round
            self._pins = Pins.from_start(self.store.entries(0, 1)[0])
        return added

    def run_start(self) -> dict[str, Any]:
        if not len(self.store):
            raise LedgerError(0, Issue.MISSING, f"site {self.site!r} has no run_start entry yet")
        return self.store.entries(0, 1)[0].data

    def sign(
        self,
        round_idx: int,
        *,
        digest: str,
        kind: str,
        num_examples: int,
        metrics: Mapping[str, float],
        epsilon: float | None = None,
    ) -> Receipt:
        """Sign what this site sends in ``round_idx``; needs no help from the coordinator."""
        start = self.run_start()
        body = canonical_json(
            {
                "run_id": start["run_id"],
                "config_hash": start["config_hash"],
                "round": round_idx,
                "site": self.site,
                "digest": digest,
                "update_kind": kind,
                "num_examples": int(num_examples),
                "metrics": {str(k): float(v) for k, v in metrics.items()},
                "epsilon": epsilon,
                "replica_head": head_hash(self.store),
            }
        )
        signature = sign_body(self.key, EntryKind.UPDATE, self.site, body, link=None)
        return Receipt(self.site, body, signature)

    def sign_update(self, round_idx: int, update: Update) -> Receipt:
        eps = update.metrics.get("epsilon")
        return self.sign(
            round_idx,
            digest=update_digest(update),
            kind=str(update.kind),
            num_examples=update.num_examples,
            metrics=update.metrics,
            epsilon=None if eps is None else float(eps),
        )
