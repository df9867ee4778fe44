"""One small federated run with a ledger, shared by the audit tests (each works on a copy)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from medfed.config import build_config
from medfed.engine import run
from tests.conftest import make_federation

ROUNDS = 3


def ledger_config(*extra: str, rounds: int = ROUNDS, faults: tuple[dict, ...] = ()):
    return build_config(
        {"faults": list(faults)},
        [
            f"federation.rounds={rounds}",
            "federation.min_clients=2",
            "model.name=medfed:tinycnn",
            "train.batch_size=16",
            "train.max_steps=2",
            "device=cpu",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """3 sites, 3 rounds; site1 sends NaN in round 1 (rejected, but its signed entry stays)."""
    out = tmp_path_factory.mktemp("ledger") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = ledger_config(faults=({"site": "site1", "kind": "nan", "rounds": [1]},))
        run(config, out_dir=out, federation=make_federation(n=24), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def tamper(db: Path, *statements: tuple[str, tuple]) -> None:
    """Edit a ledger file the way an attacker would: drop the append-only triggers first."""
    con = sqlite3.connect(db)
    with con:
        con.execute("DROP TRIGGER IF EXISTS entries_no_update")
        con.execute("DROP TRIGGER IF EXISTS entries_no_delete")
        for sql, args in statements:
            con.execute(sql, args)
    con.close()
