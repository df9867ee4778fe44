"""The report's "Ledger" block: each run's ledger head and whether it verifies, one row per run.

The head hash is what a reader compares with a site's replica or a published value; the status is
:func:`medfed.audit.verify.verify_run` run at report time (the report says when it is broken).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

from medfed.audit.run import LEDGER_FILE

LEDGER_SECTION = ("ledger", "Ledger")
LEDGER_NOTE = (
    "Each run keeps a hash-chained, Ed25519-signed ledger of every update, aggregate and "
    "checkpoint (RUN_DIR/ledger). Check one yourself with `medfed ledger verify RUN_DIR`; "
    "`medfed ledger show RUN_DIR` lists who contributed what in each round. Cyclic and gossip "
    "runs record every model hand-over signed by the site that made it; a one-shot run records "
    "each site's single upload and the distillation, and each teacher keeps its own ledger."
)


@dataclass(frozen=True)
class LedgerRow:
    run: str  # relative to the study directory
    entries: int
    rounds: int
    head: str
    ok: bool
    status: str
    paradigm: str = "client-server"  # the run's; "one_shot teacher" for a teacher's own ledger


def ledger_runs(study_dir: Path) -> list[Path]:
    """Run directories under ``study_dir`` (``runs/<network>/<paradigm>/...``, or itself)."""
    return sorted(p.parent.parent for p in Path(study_dir).glob(f"**/{LEDGER_FILE.as_posix()}"))


def has_ledgers(study_dir: Path) -> bool:
    return bool(ledger_runs(study_dir))


def ledger_rows(study_dir: Path) -> list[LedgerRow]:
    from medfed.audit.verify import verify_run

    rows = []
    for run in ledger_runs(study_dir):
        rel = run.relative_to(study_dir).as_posix() if run != study_dir else "."
        try:
            v = verify_run(run)
        except (OSError, ValueError) as err:
            rows.append(LedgerRow(rel, 0, 0, "", False, f"unreadable: {err}"))
            continue
        status = "verified" if v.ok else f"BROKEN at {v.problems[0].describe()}"
        teacher = run.parent.name == "sites" and (run.parent.parent / LEDGER_FILE).is_file()
        paradigm = "one_shot teacher" if teacher else v.paradigm
        rows.append(LedgerRow(rel, v.entries, v.rounds, v.head or "", v.ok, status, paradigm))
    return rows


def ledger_html(study_dir: Path) -> str:
    rows = ledger_rows(study_dir)
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{escape(r.run)}</td><td>{escape(r.paradigm)}</td>"
        f"<td>{r.entries}</td><td>{r.rounds}</td>"
        f'<td><code title="{escape(r.head)}">{escape(r.head[:16])}…</code></td>'
        f'<td class="{"ok" if r.ok else "bad"}">{escape(r.status)}</td></tr>'
        for r in rows
    )
    head = "<tr><th>run</th><th>paradigm</th><th>entries</th><th>rounds</th><th>head hash</th><th>status</th></tr>"
    return f"<p>{escape(LEDGER_NOTE)}</p><table><thead>{head}</thead><tbody>{body}</tbody></table>"
