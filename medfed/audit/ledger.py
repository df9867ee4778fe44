"""The ledger's core: signed, hash-chained entries in an append-only SQLite table.

An entry is ``(index, kind, prev, signer, signature, body)`` plus its ``hash``:

* ``body`` is the canonical JSON of what the entry records (:mod:`medfed.audit.canonical`);
* ``hash = SHA-256(canonical_json({index, kind, prev, signer, signature}) + b"\\n" + body)``, and
  ``prev`` is the predecessor's hash (64 zeros for entry 0), so changing, dropping, inserting or
  reordering any entry breaks every link after it;
* ``signature`` is Ed25519 over ``DOMAIN + canonical_json({kind, signer, link}) + b"\\n" + body``.
  The coordinator signs ``link = {index, prev}`` too, committing to the whole chain so far; a site
  signs ``link = null``, because it produces its update entry before the coordinator has placed
  it (the body names the run and the round, so it cannot be replayed elsewhere).

Public keys are pinned in entry 0 (``run_start``). A site keeps a replica and accepts new entries
only through :func:`extend_replica`, the one function the simulator and a Flower SuperNode both
use: an entry that contradicts the replica is a fork or a rewrite, and the site refuses it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.audit.canonical import sha256_hex
from medfed.audit.keys import KeyFileError, public_from_hex, verify_signature
from medfed.types import StrEnum

DOMAIN = b"medfed-ledger/1\n"
GENESIS = "0" * 64
COORDINATOR = "coordinator"


class EntryKind(StrEnum):
    RUN_START = "run_start"
    UPDATE = "update"  # site-signed: one site's update in one round
    ROUND = "round"  # coordinator: the aggregate, who was included, who was rejected and why
    CHECKPOINT = "checkpoint"
    RESUME = "resume"
    RUN_END = "run_end"


class Issue(StrEnum):
    """What is wrong with an entry (the verifier's and the replica's vocabulary)."""

    MISSING = "missing"  # an index is absent: an entry was deleted
    HASH_MISMATCH = "hash_mismatch"  # the stored hash is not the hash of the stored entry
    BROKEN_LINK = "broken_link"  # prev is not the predecessor's hash
    MALFORMED = "malformed"  # unknown kind, unreadable body, wrong run
    UNPINNED_SIGNER = "unpinned_signer"  # signed by a name with no pinned key
    BAD_SIGNATURE = "bad_signature"  # the pinned key did not sign this entry
    OUT_OF_ORDER = "out_of_order"  # rounds, updates or the run's end in an impossible order
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # a checkpoint file differs from its entry
    TRUNCATED = "truncated"  # entries are missing at the end
    REPLICA_MISMATCH = "replica_mismatch"  # a site's replica disagrees with the coordinator


class LedgerError(ValueError):
    """The ledger cannot be extended as asked (a fork, a rewrite, a bad signature)."""

    def __init__(self, index: int, issue: Issue, detail: str) -> None:
        super().__init__(f"ledger entry {index}: {issue}: {detail}")
        self.index, self.issue, self.detail = index, issue, detail


@dataclass(frozen=True)
class Entry:
    index: int
    kind: str
    prev: str
    signer: str
    signature: str
    body: bytes
    hash: str

    @cached_property
    def data(self) -> dict[str, Any]:
        """The decoded body (cached: verification reads it more than once)."""
        value = json.loads(self.body)
        if not isinstance(value, dict):
            raise ValueError("body is not a JSON object")
        return value

    def row(self) -> tuple[int, str, str, str, str, str, str]:
        """As a SQLite row: (idx, kind, prev, signer, signature, body, hash)."""
        body = self.body.decode("utf-8")
        return (self.index, self.kind, self.prev, self.signer, self.signature, body, self.hash)

    def computed_hash(self) -> str:
        return entry_hash(self.index, self.kind, self.prev, self.signer, self.signature, self.body)

    def to_wire(self) -> str:
        """One JSON line, for a Flower message or an export."""
        return json.dumps(
            {
                "index": self.index,
                "kind": self.kind,
                "prev": self.prev,
                "signer": self.signer,
                "signature": self.signature,
                "body": self.body.decode("utf-8"),
                "hash": self.hash,
            },
            sort_keys=True,
        )

    @classmethod
    def from_wire(cls, text: str) -> Entry:
        d = json.loads(text)
        return cls(
            index=int(d["index"]),
            kind=str(d["kind"]),
            prev=str(d["prev"]),
            signer=str(d["signer"]),
            signature=str(d["signature"]),
            body=str(d["body"]).encode("utf-8"),
            hash=str(d["hash"]),
        )


_str = json.encoder.encode_basestring  # the C escaper json.dumps(ensure_ascii=False) uses


def entry_hash(index: int, kind: str, prev: str, signer: str, signature: str, body: bytes) -> str:
    # canonical_json({index, kind, prev, signer, signature}) written out: keys in sorted order
    # (verification is hot; tests check it against json.dumps)
    head = (
        f'{{"index":{int(index)},"kind":{_str(kind)},"prev":{_str(prev)},'
        f'"signature":{_str(signature)},"signer":{_str(signer)}}}'
    )
    return sha256_hex(head.encode() + b"\n" + body)


def signed_message(kind: str, signer: str, body: bytes, link: tuple[int, str] | None) -> bytes:
    """``DOMAIN + canonical_json({kind, link, signer}) + b"\\n" + body``, written out."""
    linked = "null" if link is None else f'{{"index":{int(link[0])},"prev":{_str(link[1])}}}'
    head = f'{{"kind":{_str(kind)},"link":{linked},"signer":{_str(signer)}}}'
    return DOMAIN + head.encode() + b"\n" + body


def _link(signer: str, index: int, prev: str) -> tuple[int, str] | None:
    return (index, prev) if signer == COORDINATOR else None


def sign_body(
    key: Ed25519PrivateKey, kind: str, signer: str, body: bytes, *, link: tuple[int, str] | None
) -> str:
    return key.sign(signed_message(kind, signer, body, link)).hex()


def make_entry(
    *,
    index: int,
    prev: str,
    kind: EntryKind,
    signer: str,
    body: bytes,
    signature: str | None = None,
    key: Ed25519PrivateKey | None = None,
) -> Entry:
    """A new entry; the coordinator's are signed here, a site's arrive already signed."""
    if signature is None:
        if key is None:
            raise ValueError("make_entry needs a signature or a key")
        signature = sign_body(key, kind, signer, body, link=_link(signer, index, prev))
    return Entry(
        index,
        str(kind),
        prev,
        signer,
        signature,
        body,
        entry_hash(index, str(kind), prev, signer, signature, body),
    )


# --- pinned keys ---


class Pins:
    """The public keys pinned by a run's first entry, parsed once (verification is hot)."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self.hex = dict(keys)
        self._keys: dict[str, Ed25519PublicKey] = {}

    @classmethod
    def from_start(cls, entry: Entry) -> Pins:
        try:
            keys = entry.data["keys"]
            if not isinstance(keys, dict) or COORDINATOR not in keys:
                raise ValueError("no coordinator key")
        except (ValueError, KeyError) as err:
            raise LedgerError(
                entry.index, Issue.MALFORMED, f"run_start pins no keys ({err})"
            ) from None
        return cls({str(k): str(v) for k, v in keys.items()})

    def key(self, signer: str) -> Ed25519PublicKey | None:
        if signer not in self.hex:
            return None
        if signer not in self._keys:
            try:
                self._keys[signer] = public_from_hex(self.hex[signer])
            except KeyFileError:
                return None
        return self._keys[signer]


def check_entry(
    entry: Entry, *, index: int, prev: str, pins: Pins | None, signature: bool = True
) -> tuple[Issue, str] | None:
    """The first thing wrong with ``entry`` at position ``index`` after ``prev``, or None.

    ``pins`` None: ``entry`` is the run-start entry and pins its own keys. ``signature=False``
    skips the one expensive check (see :func:`signature_ok`), for a caller that batches it.
    """
    if entry.index != index:
        return Issue.MISSING, (
            f"expected entry {index}, found entry {entry.index}"
            + (" (an entry was deleted)" if entry.index > index else " (entries reordered)")
        )
    if entry.computed_hash() != entry.hash:
        return Issue.HASH_MISMATCH, "the stored hash is not the hash of the stored entry (edited)"
    if entry.prev != prev:
        return Issue.BROKEN_LINK, (
            f"prev {entry.prev[:12]}… is not the hash of entry {index - 1} ({prev[:12]}…)"
        )
    try:
        kind = EntryKind(entry.kind)
        entry.data  # noqa: B018 - parse check
    except ValueError as err:
        return Issue.MALFORMED, f"unreadable entry ({err})"
    if pins is None:
        if kind is not EntryKind.RUN_START or entry.signer != COORDINATOR:
            return Issue.MALFORMED, "the first entry must be the coordinator's run_start"
        try:
            pins = Pins.from_start(entry)
        except LedgerError as err:
            return err.issue, err.detail
    if pins.key(entry.signer) is None:
        return Issue.UNPINNED_SIGNER, f"signer {entry.signer!r} has no key pinned in run_start"
    if signature and not signature_ok(entry, pins):
        return BAD_SIGNATURE
    return None


BAD_SIGNATURE = (Issue.BAD_SIGNATURE, "not signed by the key pinned for its signer")


def signature_ok(entry: Entry, pins: Pins) -> bool:
    """Whether the key pinned for the entry's signer signed it (Ed25519: the costly check)."""
    public = pins.key(entry.signer)
    if public is None:
        return False
    message = signed_message(
        entry.kind, entry.signer, entry.body, _link(entry.signer, entry.index, entry.prev)
    )
    return verify_signature(public, entry.signature, message)


# --- storage ---


class ChainStore(Protocol):
    """Where a chain lives: the coordinator's SQLite file, a site's replica (file or memory)."""

    def __len__(self) -> int: ...
    def entries(self, start: int = 0, stop: int | None = None) -> list[Entry]: ...
    def append(self, entries: Sequence[Entry]) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY, kind TEXT NOT NULL, prev TEXT NOT NULL, signer TEXT NOT NULL,
    signature TEXT NOT NULL, body TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


class SqliteChain:
    """A chain in one SQLite file. Append-only by construction (triggers refuse UPDATE/DELETE);
    a deliberate tamperer can drop them, which is what the hash chain and signatures catch."""

    def __init__(self, path: Path, *, create: bool = True, durable: bool = True) -> None:
        """``durable=False`` skips fsync: for the simulator's replicas, which a later delivery
        repairs (the coordinator resends from the start after a restart)."""
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no ledger at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        if not durable:  # no fsync, rollback journal in memory: nothing touches the disk twice
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.execute("PRAGMA journal_mode = MEMORY")
        if create:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        """One past the highest index (O(log n); equals the row count of an untampered file)."""
        row = self._db.execute("SELECT MAX(idx) FROM entries").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def rows(self, start: int = 0, stop: int | None = None) -> list[tuple[Any, ...]]:
        """Rows in index order, exactly as stored (a tampered file reads back as tampered)."""
        sql = "SELECT idx, kind, prev, signer, signature, body, hash FROM entries WHERE idx >= ?"
        args: list[int] = [start]
        if stop is not None:
            sql += " AND idx < ?"
            args.append(stop)
        return list(self._db.execute(sql + " ORDER BY idx", args).fetchall())

    def entries(self, start: int = 0, stop: int | None = None) -> list[Entry]:
        return [
            Entry(int(i), str(k), str(p), str(s), str(sig), str(b).encode("utf-8"), str(h))
            for i, k, p, s, sig, b, h in self.rows(start, stop)
        ]

    def append(self, entries: Sequence[Entry]) -> None:
        with self._db:  # one transaction: a round's entries land together or not at all
            self._db.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (e.index, e.kind, e.prev, e.signer, e.signature, e.body.decode("utf-8"), e.hash)
                    for e in entries
                ],
            )


class MemoryChain:
    """A replica held in memory (a Flower node's ``Context.state`` when it has no ledger dir)."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self, start: int = 0, stop: int | None = None) -> list[Entry]:
        return self._entries[start:stop]

    def append(self, entries: Sequence[Entry]) -> None:
        self._entries.extend(entries)


def head_hash(store: ChainStore) -> str:
    n = len(store)
    return store.entries(n - 1, n)[0].hash if n else GENESIS


def extend_replica(
    store: ChainStore,
    incoming: Sequence[Entry],
    *,
    site: str | None = None,
    site_key: str | None = None,
    coordinator_key: str | None = None,
    pins: Pins | None = None,
) -> int:
    """Add the coordinator's ``incoming`` entries to a site's replica; returns how many were new.

    ``pins``: the keys the replica's own run_start pins, when the caller has them parsed already.

    Entries the replica already holds must be identical (same hash); new ones must continue the
    chain (index, hash, link), name pinned signers, and the coordinator's must carry its valid
    signature, which commits to every earlier entry through the signed link. (The sites'
    signatures were checked by the coordinator on arrival and are re-checked by
    ``medfed ledger verify``; checking all of them at every site would cost sites x entries per
    round in a simulation.) A site checks that the run pins its own key (``site``/``site_key``)
    and, when it was told, the coordinator's (``coordinator_key``). Anything else is a fork or a
    rewrite: :class:`LedgerError`, and nothing is appended.
    """
    have = len(store)
    ordered = sorted(incoming, key=lambda e: e.index)
    if ordered and ordered[0].index > have:
        raise LedgerError(
            have,
            Issue.MISSING,
            f"sent entries start at {ordered[0].index}, the replica holds {have}",
        )
    old = [e for e in ordered if e.index < have]
    if old:
        mine = {e.index: e.hash for e in store.entries(old[0].index, old[-1].index + 1)}
        for e in old:
            if mine.get(e.index) != e.hash:
                raise LedgerError(
                    e.index,
                    Issue.REPLICA_MISMATCH,
                    "the coordinator sent a different entry than this site's replica holds "
                    "(a fork or a rewrite of history); refusing to continue",
                )
    if pins is None and have:
        pins = Pins.from_start(store.entries(0, 1)[0])
    elif not have:
        pins = None
    prev = head_hash(store)
    new: list[Entry] = []
    for e in ordered:
        if e.index < have:
            continue
        problem = check_entry(e, index=have + len(new), prev=prev, pins=pins, signature=False)
        if problem is not None:
            raise LedgerError(e.index, *problem)
        if pins is None:
            pins = Pins.from_start(e)
            _check_pinned(
                pins, e.index, site=site, site_key=site_key, coordinator_key=coordinator_key
            )
        if e.signer in (COORDINATOR, site) and not signature_ok(e, pins):
            raise LedgerError(e.index, *BAD_SIGNATURE)
        new.append(e)
        prev = e.hash
    if new:
        store.append(new)
    return len(new)


def _check_pinned(
    pins: Pins, index: int, *, site: str | None, site_key: str | None, coordinator_key: str | None
) -> None:
    if site is not None and site_key is not None and pins.hex.get(site) != site_key:
        raise LedgerError(
            index, Issue.UNPINNED_SIGNER, f"the run does not pin site {site!r}'s own key"
        )
    if coordinator_key is not None and pins.hex.get(COORDINATOR) != coordinator_key:
        raise LedgerError(
            index, Issue.UNPINNED_SIGNER, "the run pins a coordinator key this site does not trust"
        )
