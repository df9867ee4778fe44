"""The chain and the replica rule on hand-built ledgers (keys we hold, a few entries)."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from medfed.audit.canonical import canonical_json
from medfed.audit.keys import new_key, public_hex
from medfed.audit.ledger import (
    COORDINATOR,
    DOMAIN,
    GENESIS,
    EntryKind,
    Issue,
    LedgerError,
    MemoryChain,
    SqliteChain,
    check_entry,
    entry_hash,
    extend_replica,
    make_entry,
    signed_message,
)
from medfed.audit.site import SiteLedger
from medfed.audit.verify import walk_chain
from tests.audit.conftest import ledger_config

COORD, SITE_A, SITE_B = new_key(), new_key(), new_key()
PINS = {COORDINATOR: public_hex(COORD), "a": public_hex(SITE_A), "b": public_hex(SITE_B)}


def chain(n_rounds: int = 2, *, key=COORD):
    """run_start, then per round: a's and b's signed updates and the coordinator's round."""
    out = []

    def add(kind, signer, body, k):
        prev = out[-1].hash if out else GENESIS
        out.append(
            make_entry(
                index=len(out),
                prev=prev,
                kind=kind,
                signer=signer,
                body=canonical_json({"run_id": "r1", **body}),
                key=k,
            )
        )

    add(EntryKind.RUN_START, COORDINATOR, {"keys": PINS, "config_hash": "c"}, key)
    for r in range(n_rounds):
        digests = {}
        for site, k in (("a", SITE_A), ("b", SITE_B)):
            digests[site] = f"{r}{site}" * 8
            add(EntryKind.UPDATE, site, {"round": r, "site": site, "digest": digests[site]}, k)
        add(
            EntryKind.ROUND,
            COORDINATOR,
            {"round": r, "included": ["a", "b"], "update_digests": digests, "rejected": {}},
            key,
        )
    return out


def test_entry_hash_and_signature_follow_the_documented_encoding():
    e = chain(1)[1]
    head = json.dumps(
        {"index": 1, "kind": "update", "prev": e.prev, "signer": "a", "signature": e.signature},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert e.hash == hashlib.sha256(head.encode() + b"\n" + e.body).hexdigest()
    signed = DOMAIN + b'{"kind":"update","link":null,"signer":"a"}\n' + e.body
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(PINS["a"])).verify(
        bytes.fromhex(e.signature), signed
    )  # raises if the site's signature is not over exactly these bytes
    c = chain(1)[3]  # the coordinator also signs the link
    link = json.dumps({"index": 3, "prev": c.prev}, sort_keys=True, separators=(",", ":"))
    signed = DOMAIN + f'{{"kind":"round","link":{link},"signer":"coordinator"}}\n'.encode() + c.body
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(PINS[COORDINATOR])).verify(
        bytes.fromhex(c.signature), signed
    )


def test_a_valid_chain_walks_clean_and_a_story_error_is_named():
    es = chain(2)
    problem, state = walk_chain(es)
    assert problem is None and state.rounds == {0, 1}
    # the coordinator (holding its key) claims a site that sent nothing this round
    bad = chain(1)
    d = bad[3].data | {"included": ["a", "b", "c"]}
    bad[3] = make_entry(
        index=3,
        prev=bad[2].hash,
        kind=EntryKind.ROUND,
        signer=COORDINATOR,
        body=canonical_json(d),
        key=COORD,
    )
    problem, _ = walk_chain(bad)
    assert (problem.index, problem.issue) == (3, Issue.OUT_OF_ORDER)
    assert "'c'" in problem.detail


def test_an_update_for_the_wrong_round_is_out_of_order():
    es = chain(1)
    body = canonical_json({"run_id": "r1", "round": 5, "site": "a", "digest": "x"})
    es[1] = make_entry(
        index=1, prev=es[0].hash, kind=EntryKind.UPDATE, signer="a", body=body, key=SITE_A
    )
    problem, _ = walk_chain(es[:2])
    assert (problem.index, problem.issue) == (1, Issue.OUT_OF_ORDER)


def test_check_entry_needs_run_start_first():
    es = chain(1)
    assert check_entry(es[1], index=0, prev=GENESIS, pins=None)[0] is Issue.MISSING


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_replica_grows_only_by_valid_extensions(tmp_path, store):
    replica = MemoryChain() if store == "memory" else SqliteChain(tmp_path / "r.sqlite")
    es = chain(2)
    assert extend_replica(replica, es[:4], site="a", site_key=PINS["a"]) == 4
    assert extend_replica(replica, es, site="a", site_key=PINS["a"]) == 3  # overlap is fine
    assert extend_replica(replica, es[2:], site="a", site_key=PINS["a"]) == 0
    assert [e.hash for e in replica.entries()] == [e.hash for e in es]


def test_a_fork_or_rewrite_is_refused_and_nothing_is_appended():
    replica = MemoryChain(chain(1))
    # the coordinator rewrites history with its real key: a valid chain, but not this one
    rewritten = chain(2)
    d = rewritten[2].data
    rewritten[2] = make_entry(
        index=2,
        prev=rewritten[1].hash,
        kind=EntryKind.UPDATE,
        signer="b",
        body=canonical_json(d | {"digest": "evil"}),
        key=SITE_B,
    )
    with pytest.raises(LedgerError, match="entry 2: replica_mismatch") as err:
        extend_replica(replica, rewritten)
    assert err.value.index == 2 and len(replica) == 4


def test_gaps_bad_signatures_and_unpinned_sites_are_refused():
    es = chain(2)
    with pytest.raises(LedgerError) as err:
        extend_replica(MemoryChain(es[:2]), es[3:])
    assert (err.value.index, err.value.issue) == (2, Issue.MISSING)
    forged = make_entry(  # the coordinator's round entry, signed by someone else
        index=6,
        prev=es[5].hash,
        kind=EntryKind.ROUND,
        signer=COORDINATOR,
        body=es[6].body,
        key=new_key(),
    )
    with pytest.raises(LedgerError) as err:
        extend_replica(MemoryChain(es[:4]), [*es[4:6], forged])
    assert (err.value.index, err.value.issue) == (6, Issue.BAD_SIGNATURE)
    # a site's own entry, forged in its name: it knows its key
    mine = make_entry(
        index=4, prev=es[3].hash, kind=EntryKind.UPDATE, signer="a", body=es[4].body, key=new_key()
    )
    with pytest.raises(LedgerError) as err:
        extend_replica(MemoryChain(es[:4]), [mine], site="a")
    assert (err.value.index, err.value.issue) == (4, Issue.BAD_SIGNATURE)
    with pytest.raises(LedgerError) as err:  # a name the run never pinned
        extend_replica(MemoryChain(es[:4]), [replace_signer(es[4], "mallory")])
    assert (err.value.index, err.value.issue) == (4, Issue.UNPINNED_SIGNER)
    with pytest.raises(LedgerError) as err:  # the run does not pin this site's own key
        extend_replica(MemoryChain(), es, site="a", site_key=public_hex(new_key()))
    assert err.value.issue is Issue.UNPINNED_SIGNER
    with pytest.raises(LedgerError):  # a coordinator the site was told not to trust
        extend_replica(MemoryChain(), es, coordinator_key=public_hex(new_key()))


def test_a_site_signs_what_it_sends_with_the_run_it_replicates():
    site = SiteLedger("a", SITE_A, MemoryChain())
    with pytest.raises(LedgerError, match="no run_start"):
        site.sign(0, digest="d", kind="weights", num_examples=3, metrics={})
    site.receive(chain(1))
    receipt = site.sign(1, digest="d" * 64, kind="weights", num_examples=3, metrics={"loss": 0.5})
    body = json.loads(receipt.body)
    assert (
        body["run_id"] == "r1" and body["round"] == 1 and body["replica_head"] == chain(1)[-1].hash
    )
    e = make_entry(
        index=4,
        prev=chain(1)[-1].hash,
        kind=EntryKind.UPDATE,
        signer="a",
        body=receipt.body,
        signature=receipt.signature,
    )
    assert check_entry(e, index=4, prev=chain(1)[-1].hash, pins=None if False else _pins()) is None


def replace_signer(e, signer):
    return make_entry(
        index=e.index,
        prev=e.prev,
        kind=EntryKind(e.kind),
        signer=signer,
        body=e.body,
        key=new_key(),
    )


def _pins():
    from medfed.audit.ledger import Pins

    return Pins(PINS)


def test_simulated_sites_refuse_a_round_when_their_replica_was_forked(tmp_path):
    from medfed.audit.run import RunLedger

    runtime = SimpleNamespace(site_ledgers={}, receipts={})
    ledger = RunLedger.for_run(
        ledger_config(), tmp_path, site_names=["s0", "s1"], runtime=runtime, config_hash="c"
    )
    assert ledger is not None and set(runtime.site_ledgers) == {"s0", "s1"}
    ledger.begin(last_round=-1, strategy="fedavg", runtime_name="test", sites=["s0", "s1"])
    assert ledger.deliver(["s0", "s1"]) == {}
    # s1's replica holds an entry 1 the coordinator never wrote (the coordinator forked)
    other = make_entry(
        index=1,
        prev=ledger.head,
        kind=EntryKind.RESUME,
        signer=COORDINATOR,
        body=canonical_json({"run_id": ledger.run_id, "from_round": -1}),
        key=ledger.key,
    )
    runtime.site_ledgers["s1"].store.append([other])
    ledger._append(EntryKind.RESUME, {"from_round": -1, "superseded_rounds": []})
    refused = ledger.deliver(["s0", "s1"])
    assert list(refused) == ["s1"] and "entry 1" in refused["s1"] and "fork" in refused["s1"]
    assert len(runtime.site_ledgers["s0"].store) == 2


@given(
    index=st.integers(0, 10**12),
    kind=st.text(max_size=8),
    prev=st.text(max_size=8),
    signer=st.text(max_size=8),
    signature=st.text(max_size=8),
    link=st.none() | st.tuples(st.integers(0, 10**6), st.text(max_size=8)),
)
def test_the_written_out_encodings_equal_canonical_json(index, kind, prev, signer, signature, link):
    """The hot-path header strings are byte-for-byte the canonical JSON (any text, escapes)."""
    ref = json.dumps(
        {"index": index, "kind": kind, "prev": prev, "signer": signer, "signature": signature},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    assert (
        entry_hash(index, kind, prev, signer, signature, b"{}")
        == hashlib.sha256(ref + b"\n{}").hexdigest()
    )  # noqa: E501
    linked = None if link is None else {"index": link[0], "prev": link[1]}
    head = canonical_json({"kind": kind, "link": linked, "signer": signer})
    assert signed_message(kind, signer, b"{}", link) == DOMAIN + head + b"\n{}"
