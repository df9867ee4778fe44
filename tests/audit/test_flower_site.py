"""A Flower site's half of the ledger without a network: the node's state keeps its key and
replica between messages, the wire encoding round-trips, and a fork makes the site refuse."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402

from medfed.audit.canonical import canonical_json  # noqa: E402
from medfed.audit.keys import new_key, public_hex  # noqa: E402
from medfed.audit.ledger import (  # noqa: E402
    COORDINATOR,
    GENESIS,
    EntryKind,
    LedgerError,
    SqliteChain,
    make_entry,
)
from medfed.runtime.flower.client import _keep_ledger, site_ledger  # noqa: E402
from medfed.runtime.flower.codec import (  # noqa: E402
    Key,
    entries_from_content,
    entries_record,
    receipt_from_content,
    receipt_record,
)

COORD = new_key()


def _context(**node) -> Context:
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})


def _chain(site_pub: str, *, body_extra: dict | None = None, site: str = "h"):
    start = make_entry(
        index=0,
        prev=GENESIS,
        kind=EntryKind.RUN_START,
        signer=COORDINATOR,
        body=canonical_json(
            {
                "run_id": "r",
                "config_hash": "c",
                "keys": {COORDINATOR: public_hex(COORD), site: site_pub},
            }
        ),
        key=COORD,
    )
    nxt = make_entry(
        index=1,
        prev=start.hash,
        kind=EntryKind.RESUME,
        signer=COORDINATOR,
        body=canonical_json({"run_id": "r", "from_round": -1, **(body_extra or {})}),
        key=COORD,
    )
    return [start, nxt]


def test_a_node_without_a_ledger_folder_keeps_key_and_replica_in_its_state():
    ctx = _context()
    first = site_ledger(ctx, "h")
    _keep_ledger(ctx, first)
    again = site_ledger(ctx, "h")
    assert again.public == first.public  # the same key on the next message
    chain = _chain(first.public)
    # what the coordinator puts on the wire is what the site reads back
    wire = RecordDict({Key.LEDGER: entries_record(chain)})
    assert entries_from_content(wire) == chain
    assert again.receive(entries_from_content(wire)) == 2
    _keep_ledger(ctx, again)
    third = site_ledger(ctx, "h")
    assert [e.hash for e in third.store.entries()] == [e.hash for e in chain]
    # a rewritten entry 1, validly signed by the coordinator: the site refuses
    forked = _chain(first.public, body_extra={"note": "rewritten"})
    with pytest.raises(LedgerError, match="entry 1: replica_mismatch"):
        third.receive(forked)
    receipt = third.sign(0, digest="d" * 64, kind="weights", num_examples=5, metrics={})
    reply = RecordDict({Key.LEDGER: receipt_record(receipt, chain[-1].hash)})
    assert receipt_from_content(reply) == receipt
    assert receipt_from_content(RecordDict({"x": ConfigRecord({"a": 1})})) is None


def test_a_node_with_a_ledger_folder_keeps_them_on_its_disk(tmp_path):
    ctx = _context(**{"ledger-dir": str(tmp_path)})
    ledger = site_ledger(ctx, "h")
    assert (tmp_path / "h.key").is_file() and isinstance(ledger.store, SqliteChain)
    ledger.receive(_chain(ledger.public))
    assert len(SqliteChain(tmp_path / "h-run7.sqlite", create=False)) == 2
    with pytest.raises(LedgerError, match="does not pin site 'h'"):  # a run pinning another key
        site_ledger(_context(**{"ledger-dir": str(tmp_path / "other")}), "h").receive(
            _chain(ledger.public)
        )
    trusted = _context(**{"ledger-dir": str(tmp_path), "ledger-coordinator": "00" * 32})
    with pytest.raises(LedgerError, match="coordinator key this site does not trust"):
        site_ledger(trusted, "h2").receive(_chain(site_ledger(trusted, "h2").public, site="h2"))
