"""The study report shows each run's ledger head and whether it verifies."""

from __future__ import annotations

import shutil

from medfed.audit.ledger import SqliteChain
from medfed.audit.run import LEDGER_FILE
from medfed.report import load_study, write_report
from medfed.report.html import sections
from medfed.report.ledger_view import ledger_rows
from tests.audit.conftest import tamper
from tests.report.conftest import make_study


def _with_run(study, finished_run):
    run_dir = study / "runs" / "net0" / "federated"  # beside the fake study's history.jsonl
    for name in ("ledger", "checkpoints", "keys"):
        shutil.copytree(finished_run / name, run_dir / name)
    shutil.copy(finished_run / "final.safetensors", run_dir / "final.safetensors")
    return run_dir


def test_the_report_lists_the_ledger_head_and_its_status(tmp_path, finished_run):
    study = make_study(tmp_path / "study")
    assert ledger_rows(study) == [] and sections(load_study(study))[-1][0] != "ledger"
    run_dir = _with_run(study, finished_run)
    head = SqliteChain(run_dir / LEDGER_FILE, create=False).entries()[-1].hash
    (clean,) = ledger_rows(study)
    assert (clean.run, clean.ok, clean.status, clean.head) == (
        "runs/net0/federated",
        True,
        "verified",
        head,
    )
    assert clean.rounds == 3 and clean.entries == 17
    tamper(run_dir / LEDGER_FILE, ("DELETE FROM entries WHERE idx = ?", (3,)))
    html = write_report(study)[0].read_text()  # one full report: the section is in it
    assert 'id="ledger"' in html and head[:16] in html and "BROKEN at entry 3" in html
