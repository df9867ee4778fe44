"""`medfed keys new`, `medfed ledger verify|show`, and a resumed run's ledger."""

from __future__ import annotations

import stat

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from medfed.audit.keys import KeyFileError, load_private_key, public_hex
from medfed.audit.ledger import EntryKind, SqliteChain
from medfed.audit.run import LEDGER_FILE
from medfed.audit.summary import round_rows
from medfed.audit.verify import verify_run
from medfed.cli import main
from medfed.engine import run
from tests.audit.conftest import ledger_config, tamper
from tests.conftest import make_federation


def test_keys_new_writes_a_private_key_only_its_owner_can_read(tmp_path, capsys):
    assert main(["keys", "new", "--out", str(tmp_path), "--name", "hospital-a"]) == 0
    key = tmp_path / "hospital-a.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = serialization.load_pem_public_key((tmp_path / "hospital-a.pub").read_bytes())
    assert public_hex(pub) == public_hex(load_private_key(key))  # type: ignore[arg-type]
    assert public_hex(pub) in capsys.readouterr().out
    assert (
        main(["keys", "new", "--out", str(tmp_path), "--name", "hospital-a"]) == 1
    )  # no overwrite


def test_a_key_that_is_not_ed25519_is_refused_by_name(tmp_path):
    rsa = generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "rsa.key"
    path.write_bytes(
        rsa.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match=r"rsa\.key.*not an Ed25519"):
        load_private_key(path)


def test_verify_and_show_on_a_clean_and_a_tampered_run(run_copy, capsys):
    assert main(["ledger", "verify", str(run_copy)]) == 0
    assert "ledger OK" in capsys.readouterr().out
    assert main(["ledger", "show", str(run_copy)]) == 0
    shown = capsys.readouterr().out
    entries = SqliteChain(run_copy / LEDGER_FILE, create=False).entries()
    update = next(e for e in entries if e.kind == EntryKind.UPDATE and e.signer == "site1")
    assert "round 1" in shown and "rejected: params" in shown
    assert update.data["digest"][:12] in shown
    tamper(run_copy / LEDGER_FILE, ("DELETE FROM entries WHERE idx = ?", (update.index,)))
    assert main(["ledger", "verify", str(run_copy)]) == 1
    assert f"entry {update.index}" in capsys.readouterr().err


def test_verify_without_a_ledger_says_so(tmp_path, capsys):
    assert main(["ledger", "verify", str(tmp_path)]) == 1
    assert "no ledger" in capsys.readouterr().err


class _Crash(RuntimeError):
    pass


def test_a_resumed_run_continues_the_same_chain(tmp_path, monkeypatch):
    """Round 1 is recorded, then the process dies before its checkpoint: the resumed run keeps
    that entry (superseded), says where it resumed, records round 1 again and verifies clean."""
    torch.set_num_threads(1)
    fed = make_federation(n=24)
    import medfed.engine as engine

    real = engine.save_checkpoint

    def dies_at_round_1(*args, **kw):
        if kw["round_idx"] == 1:
            raise _Crash()
        return real(*args, **kw)

    monkeypatch.setattr(engine, "save_checkpoint", dies_at_round_1)
    config = ledger_config(rounds=2)
    with pytest.raises(_Crash):
        run(config, out_dir=tmp_path, federation=fed, progress=False)
    monkeypatch.setattr(engine, "save_checkpoint", real)
    run(config, out_dir=tmp_path, federation=fed, progress=False, resume=True)
    v = verify_run(tmp_path)
    assert v.ok, [p.describe() for p in v.problems]
    entries = SqliteChain(tmp_path / LEDGER_FILE, create=False).entries()
    resume = [e.data for e in entries if e.kind == EntryKind.RESUME]
    assert resume == [resume[0]] and resume[0]["from_round"] == 0
    assert resume[0]["superseded_rounds"] == [1]
    rows = round_rows(entries)
    assert [(r.round, r.superseded) for r in rows] == [(0, False), (1, True), (1, False)]
    assert sum(e.kind == EntryKind.RUN_START for e in entries) == 1


def test_a_file_that_is_not_a_ledger_is_reported_not_raised(tmp_path, capsys):
    (tmp_path / "ledger").mkdir()
    (tmp_path / LEDGER_FILE).write_bytes(b"not sqlite at all" * 100)
    assert main(["ledger", "verify", str(tmp_path)]) == 1
    assert "not a readable ledger" in capsys.readouterr().err
    assert main(["ledger", "show", str(tmp_path)]) == 1


def test_without_replica_files_the_sites_still_sign_and_the_ledger_verifies(tmp_path):
    """`ledger.replicas: false` (large simulations): no per-site files, the same signed chain."""
    torch.set_num_threads(1)
    run(
        ledger_config("ledger.replicas=false", rounds=1),
        out_dir=tmp_path,
        federation=make_federation(n=24),
        progress=False,
    )
    assert not (tmp_path / "ledger" / "replicas").exists()
    v = verify_run(tmp_path)
    assert v.ok and v.replicas == () and v.rounds == 1
    entries = SqliteChain(tmp_path / LEDGER_FILE, create=False).entries()
    assert sorted(e.signer for e in entries if e.kind == EntryKind.UPDATE) == [
        "site0",
        "site1",
        "site2",
    ]
