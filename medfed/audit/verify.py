"""``medfed ledger verify``: every check a third party can run on a run directory.

The checks, in order of trust: the chain (index, hash, link, pinned signer, signature of every
entry), the story it tells (updates belong to the round that follows them, a round includes only
updates recorded in it, nothing after the run's end but a ``resume`` that reopens it), the
files (every checkpoint still on disk and the final model match their recorded digests; a model
file without a ledger entry means the tail was cut), and the replicas (each site's copy is a
prefix of the coordinator's, entry for entry). The first broken entry is reported with what is
wrong; nothing after a broken link is trusted.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.audit.canonical import file_digest
from medfed.audit.ledger import (
    COORDINATOR,
    GENESIS,
    Entry,
    EntryKind,
    Issue,
    Pins,
    SqliteChain,
    check_entry,
    signature_ok,
)
from medfed.audit.lineage import Lineage
from medfed.audit.run import LEDGER_FILE, REPLICA_DIR, dir_digests
from medfed.checkpoint import checkpoint_round, list_checkpoints

LEDGER_SOURCE = "ledger"


@dataclass(frozen=True)
class Problem:
    index: int
    issue: Issue
    detail: str
    kind: str | None = None
    source: str = LEDGER_SOURCE

    def describe(self) -> str:
        what = f"entry {self.index}" + (f" ({self.kind})" if self.kind else "")
        where = "" if self.source == LEDGER_SOURCE else f" [replica {self.source}]"
        return f"{what}{where}: {self.issue}: {self.detail}"


@dataclass(frozen=True)
class Verification:
    run_dir: Path
    entries: int
    head: str | None
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()
    rounds: int = 0
    replicas: tuple[str, ...] = ()
    files_checked: int = 0
    paradigm: str = "client-server"  # run_start's; only cyclic, gossip, one-shot runs name one

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None


@dataclass
class _Walk:
    """What the chain says, as far as it could be trusted."""

    complete: bool = False
    pins: Pins | None = None
    checkpoints: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    run_end: tuple[int, dict[str, Any]] | None = None
    rounds: set[int] = field(default_factory=set)
    first_round: int = 0  # a ledger started when a run older than the ledger was resumed
    lineage: Lineage | None = None  # cyclic, gossip, one-shot: who holds which model


def walk_chain(entries: Sequence[Entry]) -> tuple[Problem | None, _Walk]:
    """Check every entry in order; the first problem wins (nothing after it is trusted).

    The cheap checks (index, hash, link, pins, the story) run in order in this thread while
    worker threads check the Ed25519 signatures (``cryptography`` releases the GIL); a bad
    signature wins at its index.
    """
    try:
        pins = Pins.from_start(entries[0]) if entries else None
    except ValueError:  # a LedgerError too
        pins = None  # the cheap pass reports what is wrong with entry 0

    def first_bad(start: int) -> int | None:
        assert pins is not None
        for pos in range(start, min(start + _CHUNK, len(entries))):
            if not signature_ok(entries[pos], pins):
                return pos
        return None

    starts = range(0, len(entries), _CHUNK) if pins else range(0)
    with ThreadPoolExecutor(max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        checks = [pool.submit(first_bad, s) for s in starts]
        found, state = _cheap_pass(entries)
        # Signatures count for all entries the cheap pass accepted, and for one whose story
        # fails (a forged body is reported as forged before what it claims is judged).
        upto = len(entries) if found is None else found.index + (found.issue in _STORY)
        bad = None
        for start, check in zip(starts, checks, strict=True):
            if start >= upto or bad is not None:
                check.cancel()
                continue
            pos = check.result()
            bad = pos if pos is not None and pos < upto else None
    if bad is not None:
        detail = f"not signed by the key pinned for {entries[bad].signer!r}"
        return Problem(bad, Issue.BAD_SIGNATURE, detail, entries[bad].kind), state
    state.complete = found is None
    return found, state


_STORY = frozenset({Issue.MALFORMED, Issue.OUT_OF_ORDER})
_CHUNK = 256


def _cheap_pass(entries: Sequence[Entry]) -> tuple[Problem | None, _Walk]:
    state = _Walk()
    prev, run_id, last = GENESIS, None, -1
    updates: dict[str, str] = {}
    for i, e in enumerate(entries):
        problem = check_entry(e, index=i, prev=prev, pins=state.pins, signature=False)
        if problem is not None:
            return Problem(i, *problem, kind=e.kind), state
        try:
            d = e.data
            if i == 0:
                state.pins = Pins.from_start(e)
                run_id, last = d["run_id"], int(d.get("first_round", 0)) - 1
                state.first_round = last + 1
                state.lineage = Lineage.from_start(d)
                prev = e.hash
                continue
            why = _story(e, d, run_id=run_id, last=last, updates=updates, state=state)
        except (KeyError, TypeError, ValueError) as err:  # LedgerError is a ValueError
            why = Issue.MALFORMED, f"body lacks or mangles a field ({err})"
        if why is not None:
            return Problem(i, why[0], why[1], e.kind), state
        if e.kind == EntryKind.ROUND:
            last = int(d["round"])
            updates.clear()
        elif e.kind == EntryKind.RESUME:
            last = int(d["from_round"])
            updates.clear()
        prev = e.hash
    return None, state


def _story(
    e: Entry, d: dict[str, Any], *, run_id: Any, last: int, updates: dict[str, str], state: _Walk
) -> tuple[Issue, str] | None:
    """The first way entry ``e`` contradicts the entries before it, or None."""
    if d.get("run_id") != run_id:
        return Issue.MALFORMED, f"belongs to run {d.get('run_id')!r}, not {run_id!r}"
    kind = EntryKind(e.kind)
    if state.run_end is not None:
        if kind is not EntryKind.RESUME:
            return Issue.OUT_OF_ORDER, f"written after the run ended (entry {state.run_end[0]})"
        # `--resume` on a finished run reopens it (a one-shot run re-enters every finished
        # teacher): the old end stays in the chain, and the run must end again.
        state.run_end = None
    if kind is EntryKind.RUN_START:
        return Issue.OUT_OF_ORDER, "a second run_start"
    if kind is EntryKind.UPDATE:
        if e.signer != d["site"] or e.signer == COORDINATOR:
            return Issue.MALFORMED, f"update of site {d['site']!r} signed by {e.signer!r}"
        if int(d["round"]) != last + 1:
            return (
                Issue.OUT_OF_ORDER,
                f"an update for round {d['round']}, expected round {last + 1}",
            )
        if e.signer in updates and not (state.lineage and state.lineage.repeats):
            return Issue.OUT_OF_ORDER, f"a second update from {e.signer!r} in round {last + 1}"
        if state.lineage is not None and (why := state.lineage.update(d)) is not None:
            return why
        updates[e.signer] = str(d["digest"])
    elif kind is EntryKind.ROUND:
        if int(d["round"]) != last + 1:
            return Issue.OUT_OF_ORDER, f"round {d['round']} follows round {last}"
        if dict(d["update_digests"]) != updates:
            return (
                Issue.OUT_OF_ORDER,
                "its update digests are not the updates recorded in this round",
            )
        missing = sorted(set(d["included"]) - set(updates))
        if missing:
            return Issue.OUT_OF_ORDER, f"includes site(s) {missing} with no update entry this round"
        if state.lineage is not None and (why := state.lineage.round(d)) is not None:
            return why
        state.rounds.add(int(d["round"]))
    elif kind is EntryKind.CHECKPOINT:
        if int(d["round"]) not in state.rounds:
            return (
                Issue.OUT_OF_ORDER,
                f"a checkpoint of round {d['round']}, which has no round entry",
            )
        state.checkpoints[int(d["round"])] = (e.index, d)
    elif kind is EntryKind.RESUME:
        if int(d["from_round"]) > last + 1 or (
            int(d["from_round"]) >= 0 and int(d["from_round"]) not in state.rounds
        ):
            return (
                Issue.OUT_OF_ORDER,
                f"resumes after round {d['from_round']}, which was never completed",
            )
        if state.lineage is not None:
            state.lineage.resume(int(d["from_round"]))
    elif kind is EntryKind.RUN_END:
        if state.lineage is not None and (why := state.lineage.end()) is not None:
            return why
        state.run_end = (e.index, d)
    return None


def _file_problems(
    run_dir: Path, entries: Sequence[Entry], state: _Walk
) -> tuple[list[Problem], int, int]:
    problems: list[Problem] = []
    checked = pruned = 0
    for _round, (i, d) in sorted(state.checkpoints.items()):
        path = run_dir / str(d["path"])
        if not path.is_dir():
            pruned += 1  # keep_last removed it; nothing left to compare
            continue
        on_disk = dir_digests(run_dir, path)
        recorded = dict(d["files"])
        for name in sorted(set(recorded) | set(on_disk)):
            checked += 1
            if name not in on_disk:
                problems.append(
                    Problem(
                        i, Issue.CHECKPOINT_MISMATCH, f"{name} is missing", EntryKind.CHECKPOINT
                    )
                )
            elif name not in recorded:
                problems.append(
                    Problem(
                        i,
                        Issue.CHECKPOINT_MISMATCH,
                        f"{name} is not recorded in the entry",
                        EntryKind.CHECKPOINT,
                    )
                )
            elif on_disk[name] != recorded[name]:
                problems.append(
                    Problem(
                        i,
                        Issue.CHECKPOINT_MISMATCH,
                        f"{name} does not match its recorded SHA-256 (replaced or changed)",
                        EntryKind.CHECKPOINT,
                    )
                )
    end = len(entries)
    if state.run_end is not None:
        i, d = state.run_end
        for name, digest in dict(d["files"]).items():
            checked += 1
            f = run_dir / name
            if not f.is_file() or file_digest(f) != digest:
                problems.append(
                    Problem(
                        i,
                        Issue.CHECKPOINT_MISMATCH,
                        f"{name} is missing or does not match its recorded SHA-256",
                        EntryKind.RUN_END,
                    )
                )
    elif (run_dir / "final.safetensors").is_file():
        problems.append(
            Problem(
                end,
                Issue.TRUNCATED,
                "final.safetensors exists but the ledger has no run_end: its tail was cut",
            )
        )
    for p in list_checkpoints(run_dir):
        r = checkpoint_round(p)
        if r is not None and r >= state.first_round and r not in state.checkpoints:
            if state.run_end is None:
                problems.append(
                    Problem(
                        end,
                        Issue.TRUNCATED,
                        f"checkpoints/{p.name} has no ledger entry: the tail was cut",
                    )
                )
            else:
                problems.append(
                    Problem(
                        state.run_end[0],
                        Issue.CHECKPOINT_MISMATCH,
                        f"checkpoints/{p.name} is not in the ledger",
                        EntryKind.RUN_END,
                    )
                )
    return problems, checked, pruned


Row = tuple[Any, ...]


def _rows(path: Path) -> list[Row]:
    """A ledger file's rows as stored, as plain tuples (comparing replicas needs no parsing)."""
    store = SqliteChain(path, create=False)
    try:
        return store.rows()
    finally:
        store.close()


def _replica_problems(
    entries: Sequence[Entry], mine: Sequence[Row], path: Path
) -> tuple[list[Problem], str | None]:
    source = str(path)
    try:
        theirs = _rows(path)
    except (FileNotFoundError, sqlite3.DatabaseError) as err:
        return [
            Problem(0, Issue.REPLICA_MISMATCH, f"cannot read the replica ({err})", source=source)
        ], None
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            what = "hash" if a[-1] != b[-1] else "content"
            return [
                Problem(
                    i,
                    Issue.REPLICA_MISMATCH,
                    f"the replica's entry differs from the coordinator's ({what})",
                    str(b[1]),
                    source,
                )
            ], None
    if len(theirs) > len(entries):
        return [
            Problem(
                len(entries),
                Issue.TRUNCATED,
                f"replica {path.name} holds {len(theirs)} entries, the coordinator's copy only {len(entries)}",
            )
        ], None
    if len(theirs) < len(entries):
        return [], f"replica {path.name} holds the first {len(theirs)} of {len(entries)} entries"
    return [], None


def read_entries(path: Path) -> list[Entry]:
    """Every row of a ledger file, as stored (read-only use; the connection is closed)."""
    store = SqliteChain(path, create=False)
    try:
        return store.entries()
    finally:
        store.close()


def default_replicas(run_dir: Path) -> list[Path]:
    """The simulator's per-site replicas, verified with the coordinator's copy by default."""
    return sorted((run_dir / REPLICA_DIR).glob("*.sqlite"))


def verify_run(
    run_dir: Path, *, replicas: Sequence[Path] = (), include_default: bool = True
) -> Verification:
    """Verify ``run_dir``'s ledger, its files, and replicas (the simulator's are included)."""
    run_dir = Path(run_dir)
    path = run_dir / LEDGER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no ledger ({LEDGER_FILE}); was ledger.enabled off?")
    try:
        entries = read_entries(path)
    except sqlite3.DatabaseError as err:
        unreadable = Problem(0, Issue.MALFORMED, f"{path} is not a readable ledger ({err})")
        return Verification(run_dir, 0, None, (unreadable,))
    if not entries:
        return Verification(run_dir, 0, None, (Problem(0, Issue.MISSING, "the ledger is empty"),))
    problem, state = walk_chain(entries)
    problems = [] if problem is None else [problem]
    notes: list[str] = []
    checked = 0
    if state.complete:
        found, checked, pruned = _file_problems(run_dir, entries, state)
        problems += found
        if pruned:
            notes.append(
                f"{pruned} checkpoint(s) recorded in the ledger were pruned (checkpoint.keep_last) and could not be compared"
            )
    given = [
        q for p in map(Path, replicas) for q in (sorted(p.glob("*.sqlite")) if p.is_dir() else [p])
    ]
    paths = [*(default_replicas(run_dir) if include_default else []), *given]
    mine = [e.row() for e in entries] if paths else []
    for rp in dict.fromkeys(paths):
        found_r, note = _replica_problems(entries, mine, rp)
        problems += found_r
        if note:
            notes.append(note)
    problems.sort(key=lambda p: p.index)  # stable: the chain's own finding first at an index
    return Verification(
        run_dir,
        len(entries),
        entries[-1].hash,
        tuple(problems),
        tuple(notes),
        rounds=len(state.rounds),
        replicas=tuple(str(p) for p in dict.fromkeys(paths)),
        files_checked=checked,
        paradigm=str(entries[0].data.get("paradigm", "client-server"))
        if state.pins
        else "client-server",
    )
