"""Tamper with a finished run, one mutation per test: each is caught at the right entry."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.audit.canonical import canonical_json
from medfed.audit.keys import new_key
from medfed.audit.ledger import COORDINATOR, EntryKind, Issue, SqliteChain, make_entry
from medfed.audit.run import LEDGER_FILE, replica_path
from medfed.audit.verify import verify_run, walk_chain
from tests.audit.conftest import ROUNDS, tamper


def entries(run_dir):
    return SqliteChain(run_dir / LEDGER_FILE, create=False).entries()


def index_of(run_dir, kind, *, round_idx=None, signer=None):
    for e in entries(run_dir):
        if (
            e.kind == kind
            and (signer is None or e.signer == signer)
            and (round_idx is None or e.data.get("round") == round_idx)
        ):
            return e.index
    raise AssertionError(f"no {kind} entry for round {round_idx} signer {signer}")


def first(run_dir, **kw):
    v = verify_run(run_dir, **kw)
    assert not v.ok, "the mutation went unnoticed"
    return v.first


def rewrite(run_dir, new_entries):
    """Replace the whole table (what an attacker with the file does to insert or reorder)."""
    tamper(
        run_dir / LEDGER_FILE,
        ("DELETE FROM entries", ()),
        *[
            (
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                (e.index, e.kind, e.prev, e.signer, e.signature, e.body.decode(), e.hash),
            )
            for e in new_entries
        ],
    )


def test_the_untouched_run_verifies_clean(finished_run):
    v = verify_run(finished_run)
    assert v.ok, [p.describe() for p in v.problems]
    assert v.rounds == ROUNDS and len(v.replicas) == 3
    # 1 start + per round (3 signed updates + round + checkpoint) + end
    assert v.entries == 1 + ROUNDS * 5 + 1
    assert v.head == entries(finished_run)[-1].hash
    kinds = [e.kind for e in entries(finished_run)]
    assert kinds[0] == EntryKind.RUN_START and kinds[-1] == EntryKind.RUN_END
    # the NaN update of round 1 is recorded, signed by its site, and the round says why it was out
    r1 = entries(finished_run)[index_of(finished_run, EntryKind.ROUND, round_idx=1)].data
    assert r1["included"] == ["site0", "site2"] and "non-finite" in r1["rejected"]["site1"]
    assert set(r1["update_digests"]) == {"site0", "site1", "site2"}


def test_changing_one_byte_of_an_entry(run_copy):
    k = index_of(run_copy, EntryKind.UPDATE, round_idx=1, signer="site1")
    body = entries(run_copy)[k].body.decode()
    pos = body.index('"num_examples":') + len('"num_examples":')
    forged = body[:pos] + ("9" if body[pos] != "9" else "8") + body[pos + 1 :]
    tamper(run_copy / LEDGER_FILE, ("UPDATE entries SET body = ? WHERE idx = ?", (forged, k)))
    p = first(run_copy, include_default=False)
    assert (p.index, p.issue, p.kind) == (k, Issue.HASH_MISMATCH, EntryKind.UPDATE)


def test_changing_an_entry_and_fixing_its_hash(run_copy):
    """A tamperer who recomputes the hash still cannot produce the site's signature."""
    k = index_of(run_copy, EntryKind.ROUND, round_idx=1)
    e = entries(run_copy)[k]
    d = e.data
    d["included"] = ["site0", "site1", "site2"]  # pretend the poisoned update was used
    d["rejected"] = {}
    forged = make_entry(
        index=k,
        prev=e.prev,
        kind=EntryKind.ROUND,
        signer=COORDINATOR,
        body=canonical_json(d),
        signature=e.signature,
    )
    tamper(
        run_copy / LEDGER_FILE,
        (
            "UPDATE entries SET body = ?, hash = ? WHERE idx = ?",
            (forged.body.decode(), forged.hash, k),
        ),
    )
    p = first(run_copy, include_default=False)
    assert (p.index, p.issue) == (k, Issue.BAD_SIGNATURE)


def test_deleting_an_entry(run_copy):
    k = index_of(run_copy, EntryKind.UPDATE, round_idx=2, signer="site0")
    tamper(run_copy / LEDGER_FILE, ("DELETE FROM entries WHERE idx = ?", (k,)))
    p = first(run_copy, include_default=False)
    assert (p.index, p.issue) == (k, Issue.MISSING)


def test_swapping_two_entries(run_copy):
    i = index_of(run_copy, EntryKind.UPDATE, round_idx=0, signer="site0")
    j = index_of(run_copy, EntryKind.UPDATE, round_idx=0, signer="site2")
    es = entries(run_copy)
    swapped = list(es)
    swapped[i], swapped[j] = es[j], es[i]
    rows = [(n, e) for n, e in enumerate(swapped)]
    tamper(
        run_copy / LEDGER_FILE,
        ("DELETE FROM entries", ()),
        *[
            (
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                (n, e.kind, e.prev, e.signer, e.signature, e.body.decode(), e.hash),
            )
            for n, e in rows
        ],
    )
    p = first(run_copy, include_default=False)
    assert p.index == i and p.issue in (Issue.MISSING, Issue.HASH_MISMATCH)


@pytest.mark.parametrize(
    "signer,signed_by,expected",
    [
        ("site1", None, Issue.BAD_SIGNATURE),  # garbage signature
        ("site1", "mallory", Issue.BAD_SIGNATURE),  # valid signature, key not the one pinned
        ("mallory", "mallory", Issue.UNPINNED_SIGNER),  # valid signature, signer not pinned
        (COORDINATOR, "mallory", Issue.BAD_SIGNATURE),  # impersonating the coordinator
    ],
)
def test_inserting_a_forged_entry(run_copy, signer, signed_by, expected):
    """A well-formed forged entry (correct index, link and hash) spliced into round 1."""
    es = entries(run_copy)
    k = index_of(run_copy, EntryKind.ROUND, round_idx=1)
    honest = es[k - 1].data
    body = canonical_json({**honest, "site": signer, "num_examples": 10_000})
    forged = make_entry(
        index=k,
        prev=es[k - 1].hash,
        kind=EntryKind.UPDATE,
        signer=signer,
        body=body,
        **({"key": new_key()} if signed_by else {"signature": "00" * 64}),
    )
    shifted = [
        make_entry(
            index=e.index + 1,
            prev=e.prev,
            kind=EntryKind(e.kind),
            signer=e.signer,
            body=e.body,
            signature=e.signature,
        )
        for e in es[k:]
    ]
    rewrite(run_copy, [*es[:k], forged, *shifted])
    p = first(run_copy, include_default=False)
    assert (p.index, p.issue) == (k, expected)


def test_truncating_the_tail_is_caught_without_replicas(run_copy):
    es = entries(run_copy)
    cut = index_of(run_copy, EntryKind.ROUND, round_idx=ROUNDS - 1)
    tamper(run_copy / LEDGER_FILE, ("DELETE FROM entries WHERE idx >= ?", (cut,)))
    shutil.rmtree(run_copy / "ledger" / "replicas")
    p = first(run_copy)
    assert (p.index, p.issue) == (cut, Issue.TRUNCATED) and cut < len(es)


def test_truncating_the_tail_is_caught_by_the_replicas(run_copy):
    """Even with the model files removed too, the sites' replicas remember the tail."""
    cut = index_of(run_copy, EntryKind.RUN_END)
    tamper(run_copy / LEDGER_FILE, ("DELETE FROM entries WHERE idx >= ?", (cut,)))
    (run_copy / "final.safetensors").unlink()
    p = first(run_copy)
    assert (p.index, p.issue) == (cut, Issue.TRUNCATED)
    assert "replica" in p.detail


def test_replacing_a_checkpoint_file(run_copy):
    ckpts = run_copy / "checkpoints"
    last, before = f"round_{ROUNDS - 1:04d}", f"round_{ROUNDS - 2:04d}"
    shutil.copy(ckpts / before / "global.safetensors", ckpts / last / "global.safetensors")
    k = index_of(run_copy, EntryKind.CHECKPOINT, round_idx=ROUNDS - 1)
    p = first(run_copy)
    assert (p.index, p.issue, p.kind) == (k, Issue.CHECKPOINT_MISMATCH, EntryKind.CHECKPOINT)
    assert f"checkpoints/{last}/global.safetensors" in p.detail


def test_replacing_the_final_model(run_copy):
    shutil.copy(
        run_copy / "checkpoints" / f"round_{ROUNDS - 2:04d}" / "global.safetensors",
        run_copy / "final.safetensors",
    )
    p = first(run_copy)
    assert (p.index, p.issue, p.kind) == (
        index_of(run_copy, EntryKind.RUN_END),
        Issue.CHECKPOINT_MISMATCH,
        EntryKind.RUN_END,
    )


def test_editing_a_replica(run_copy):
    replica = replica_path(run_copy, "site2")
    k = index_of(run_copy, EntryKind.UPDATE, round_idx=0, signer="site1")
    body = entries(run_copy)[k].body.decode().replace('"round":0', '"round":1')
    tamper(replica, ("UPDATE entries SET body = ? WHERE idx = ?", (body, k)))
    v = verify_run(run_copy)
    assert not v.ok and len(v.problems) == 1
    p = v.first
    assert (p.index, p.issue, p.source) == (k, Issue.REPLICA_MISMATCH, str(replica))


def test_an_explicit_replica_from_elsewhere_is_compared(run_copy, tmp_path):
    """`--replica PATH`: a copy a site kept on its own disk, one entry short of the truth."""
    elsewhere = tmp_path / "hospital" / "replica.sqlite"
    elsewhere.parent.mkdir()
    shutil.copy(replica_path(run_copy, "site0"), elsewhere)
    assert verify_run(run_copy, replicas=[elsewhere], include_default=False).ok
    k = index_of(run_copy, EntryKind.CHECKPOINT, round_idx=1)
    tamper(elsewhere, ("UPDATE entries SET hash = ? WHERE idx = ?", ("f" * 64, k)))
    p = first(run_copy, replicas=[elsewhere], include_default=False)
    assert (p.index, p.issue, p.source) == (k, Issue.REPLICA_MISMATCH, str(elsewhere))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_is_caught_at_its_entry(finished_run, data):
    """Property: flip one byte of any field of any entry; the walk stops exactly there."""
    es = entries(finished_run)
    k = data.draw(st.integers(0, len(es) - 1), label="entry")
    field = data.draw(st.sampled_from(["body", "signature", "prev", "hash"]), label="field")
    raw = bytearray(getattr(es[k], field) if field == "body" else getattr(es[k], field).encode())
    pos = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[pos] = raw[pos] ^ data.draw(st.integers(1, 127), label="xor")
    value = bytes(raw) if field == "body" else raw.decode("latin-1")
    mutated = [*es[:k], dataclasses.replace(es[k], **{field: value}), *es[k + 1 :]]
    problem, _ = walk_chain(mutated)
    assert problem is not None and problem.index == k, (field, problem)
