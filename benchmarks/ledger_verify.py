"""Verifying a 1,000-round ledger: ``medfed ledger verify`` vs a bare hashlib + Ed25519 loop.

Builds a synthetic run directory whose ledger looks like a real one (10 sites; per round 10
site-signed update entries, the coordinator's round entry and a checkpoint entry; run start and
end), then times :func:`medfed.audit.verify.verify_run` against the minimum any verifier must do
in the same process: read the rows, recompute every SHA-256 and check every Ed25519 signature.
The ratio is what medfed's further checks (the story of rounds, files, replicas) cost on top.

    .venv/bin/python benchmarks/ledger_verify.py                  # 1,000 rounds, 10 sites
    .venv/bin/python benchmarks/ledger_verify.py --replicas 10    # plus 10 replicas compared
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from medfed.audit.canonical import canonical_json, sha256_hex
from medfed.audit.keys import new_key, public_hex
from medfed.audit.ledger import (
    COORDINATOR,
    GENESIS,
    Entry,
    EntryKind,
    SqliteChain,
    make_entry,
    sign_body,
    signed_message,
)
from medfed.audit.run import LEDGER_FILE, REPLICA_DIR
from medfed.audit.verify import verify_run


def build(run_dir: Path, *, rounds: int, sites: int) -> int:
    """A synthetic finished run's ledger; returns the number of entries."""
    coord = new_key()
    keys = {f"site{i}": new_key() for i in range(sites)}
    pins = {COORDINATOR: public_hex(coord), **{s: public_hex(k) for s, k in keys.items()}}
    entries: list[Entry] = []
    run_id = "0" * 32

    def coordinator(kind: EntryKind, body: dict) -> None:
        prev = entries[-1].hash if entries else GENESIS
        blob = canonical_json({"run_id": run_id, **body})
        entries.append(
            make_entry(
                index=len(entries), prev=prev, kind=kind, signer=COORDINATOR, body=blob, key=coord
            )
        )

    coordinator(
        EntryKind.RUN_START,
        {"config_hash": "c" * 16, "keys": pins, "sites": sorted(keys), "first_round": 0},
    )
    for r in range(rounds):
        digests = {}
        for site, key in keys.items():
            digest = hashlib.sha256(f"{r}/{site}".encode()).hexdigest()
            digests[site] = digest
            body = canonical_json(
                {
                    "run_id": run_id,
                    "config_hash": "c" * 16,
                    "round": r,
                    "site": site,
                    "digest": digest,
                    "update_kind": "weights",
                    "num_examples": 512,
                    "metrics": {"train_loss": 0.3141592653589793, "steps": 16.0},
                    "epsilon": None,
                    "replica_head": entries[-1].hash,
                }
            )
            sig = sign_body(key, EntryKind.UPDATE, site, body, link=None)
            entries.append(
                make_entry(
                    index=len(entries),
                    prev=entries[-1].hash,
                    kind=EntryKind.UPDATE,
                    signer=site,
                    body=body,
                    signature=sig,
                )
            )
        coordinator(
            EntryKind.ROUND,
            {
                "round": r,
                "strategy": "fedavg",
                "aggregate_digest": sha256_hex(str(r).encode()),
                "included": sorted(keys),
                "rejected": {},
                "update_digests": digests,
                "epsilon": {s: 0.1 * (r + 1) for s in keys},
            },
        )
        files = {
            f"checkpoints/round_{r:04d}/{n}": sha256_hex(n.encode())
            for n in ("global.safetensors", "strategy.safetensors", "state.json")
        }
        coordinator(
            EntryKind.CHECKPOINT, {"round": r, "path": f"checkpoints/round_{r:04d}", "files": files}
        )
    coordinator(
        EntryKind.RUN_END,
        {"rounds": rounds, "final_digest": "f" * 64, "files": {}, "stopped": None},
    )
    store = SqliteChain(run_dir / LEDGER_FILE)
    store.append(entries)
    store.close()
    return len(entries)


def bare_verify(path: Path) -> int:
    """The floor: SHA-256 and Ed25519 over every row, nothing else."""
    con = sqlite3.connect(path)
    rows = con.execute(
        "SELECT idx, kind, prev, signer, signature, body, hash FROM entries ORDER BY idx"
    ).fetchall()
    con.close()
    from medfed.audit.keys import public_from_hex

    pins = {
        k: public_from_hex(v)
        for k, v in Entry(*rows[0][:5], rows[0][5].encode(), rows[0][6]).data["keys"].items()
    }
    prev = GENESIS
    for idx, kind, p, signer, sig, body, h in rows:
        blob = body.encode()
        head = json.dumps(
            {"index": idx, "kind": kind, "prev": p, "signer": signer, "signature": sig},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        assert hashlib.sha256(head + b"\n" + blob).hexdigest() == h and p == prev
        link = (idx, p) if signer == COORDINATOR else None
        pins[signer].verify(bytes.fromhex(sig), signed_message(kind, signer, blob, link))
        prev = h
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=0, help="site replicas to compare too")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        n = build(run_dir, rounds=args.rounds, sites=args.sites)
        print(
            f"built {n} entries ({args.rounds} rounds x {args.sites} sites) in {time.perf_counter() - t0:.2f} s"
        )
        for i in range(args.replicas):
            (run_dir / REPLICA_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / LEDGER_FILE, run_dir / REPLICA_DIR / f"site{i}.sqlite")
        ours, bare, ratios, cpu_ours, cpu_bare = [], [], [], [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            assert bare_verify(run_dir / LEDGER_FILE) == n
            t1, c1 = time.perf_counter(), time.process_time()
            v = verify_run(run_dir)
            t2, c2 = time.perf_counter(), time.process_time()
            assert v.ok and v.entries == n, [p.describe() for p in v.problems[:3]]
            bare.append(t1 - t0)
            ours.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
            cpu_bare.append(c1 - c0)
            cpu_ours.append(c2 - c1)
    med = statistics.median
    print("entries  replicas  bare_s  medfed_s  ratio  bare_cpu_s  medfed_cpu_s   (medians)")
    print(
        f"{n}  {args.replicas}  {med(bare):.3f}  {med(ours):.3f}  {med(ratios):.3f}  "
        f"{med(cpu_bare):.3f}  {med(cpu_ours):.3f}"
    )
    print(f"medfed wall per repeat: {' '.join(f'{x:.3f}' for x in ours)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
