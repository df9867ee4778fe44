"""``medfed keys new`` and ``medfed ledger verify|show``: the provenance commands.

Registered by :mod:`medfed.cli`; kept here so the main command line stays small.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def add_parsers(sub: Any) -> None:
    keys = sub.add_parser("keys", help="Ed25519 signing keys for the ledger")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    new = ksub.add_parser("new", help="write NAME.key (0600) and NAME.pub")
    new.add_argument("--out", type=Path, required=True, help="folder for the key pair")
    new.add_argument("--name", default="coordinator", help="file name: a site or 'coordinator'")

    ledger = sub.add_parser("ledger", help="the signed, hash-chained record of a run")
    lsub = ledger.add_subparsers(dest="ledger_command", required=True)
    ver = lsub.add_parser("verify", help="check chain, signatures, checkpoint files, replicas")
    ver.add_argument("run_dir", type=Path)
    ver.add_argument(
        "--replica",
        type=Path,
        action="append",
        default=[],
        help="a site's replica file, or a folder of them (repeatable); the simulator's "
        "replicas are always included",
    )
    show = lsub.add_parser(
        "show", help="per round: who contributed, digests, epsilon; peer runs: every hand-over"
    )
    show.add_argument("run_dir", type=Path)
    show.add_argument("--digits", type=int, default=12, help="hex digits of each digest shown")


def cmd_keys(args: argparse.Namespace) -> int:
    from medfed.audit.keys import load_private_key, public_hex, write_keypair

    path = write_keypair(args.out, args.name)
    pub = public_hex(load_private_key(path))
    out.print(f"wrote {path} (private, mode 0600) and {path.with_suffix('.pub')}")
    out.print(f"public key (pinned in a run's ledger): {pub}")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    if args.ledger_command == "verify":
        return _verify(args.run_dir, args.replica)
    return _show(args.run_dir, digits=args.digits)


def _verify(run_dir: Path, replicas: list[Path]) -> int:
    from medfed.audit.verify import verify_run

    v = verify_run(run_dir, replicas=replicas)
    for note in v.notes:
        out.print(f"note: {note}")
    if v.ok:
        out.print(
            Text.assemble(
                ("ledger OK: ", "bold green"),
                f"{v.entries} entries, {v.rounds} rounds, {v.files_checked} files checked, "
                f"{len(v.replicas)} replica(s) agree; head {v.head}",
            )
        )
        return 0
    first = v.problems[0]
    err.print(Text.assemble(("ledger BROKEN at ", "bold red"), first.describe()))
    for p in v.problems[1:]:
        err.print(f"  also: {p.describe()}")
    return 1


def _show(run_dir: Path, *, digits: int) -> int:
    import sqlite3

    from medfed.audit.run import LEDGER_FILE
    from medfed.audit.summary import round_rows
    from medfed.audit.verify import read_entries

    try:
        entries = read_entries(run_dir / LEDGER_FILE)
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{run_dir / LEDGER_FILE}: not a readable ledger ({e})") from None
    if entries:
        start = entries[0].data
        out.print(
            f"run {start.get('run_id')} · config {start.get('config_hash')} · "
            f"medfed {start.get('medfed_version')} · {start.get('runtime')} · "
            f"sites {', '.join(start.get('sites', []))} · keys {start.get('key_source')}"
            + (f" · paradigm {start['paradigm']}" if start.get("paradigm") else "")
        )
    what = {"cyclic": "consensus", "gossip": "consensus", "one_shot": "student"}
    for row in round_rows(entries):
        title = (
            f"round {row.round} · {row.strategy} · "
            f"{what.get(row.topology, 'aggregate')} {row.aggregate_digest[:digits]}"
        )
        if row.superseded:
            title += " · superseded (crashed attempt; the round was run again)"
        table = Table(title=title, title_justify="left")
        for col in ("site", "status", "examples", "update digest", "ε"):
            table.add_column(col)
        for s in row.sites:
            table.add_row(
                s.site,
                s.status,
                "" if s.num_examples is None else str(s.num_examples),
                "" if s.digest is None else s.digest[:digits],
                "" if s.epsilon is None else f"{s.epsilon:.3g}",
            )
        out.print(table)
        if row.handovers:
            out.print(_handover_table(row, digits=digits))
    out.print(f"{len(entries)} entries; head {entries[-1].hash if entries else '-'}")
    return 0


def _handover_table(row: Any, *, digits: int) -> Table:
    """Every hop (cyclic) or step (gossip) of a round, as each site signed it."""
    cyclic = row.topology == "cyclic"
    table = Table(
        title=f"round {row.round} · {'hops' if cyclic else 'steps'}", title_justify="left"
    )
    cols = ("hop", "site", "from", "to") if cyclic else ("step", "site", "merged", "version")
    start, made = ("trained from", "passed on") if cyclic else ("own model before", "new model")
    for col in (*cols, start, made):
        table.add_column(col)
    for h in row.handovers:
        last = h.passed_to or "-" if cyclic else str(h.version)
        table.add_row(
            str(h.position), h.site, h.received, last, h.start_digest[:digits], h.digest[:digits]
        )
    return table


HANDLERS = {"keys": cmd_keys, "ledger": cmd_ledger}
