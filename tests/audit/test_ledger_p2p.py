"""The ledger of cyclic, gossip and one-shot runs: it verifies, its digests are the files', and
tampering (a model byte, a deleted / reordered / edited entry, a dropped hop) is named."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medfed.audit.canonical import canonical_json
from medfed.audit.keys import load_private_key
from medfed.audit.ledger import COORDINATOR, GENESIS, EntryKind, Issue, SqliteChain, make_entry
from medfed.audit.run import LEDGER_FILE
from medfed.audit.summary import round_rows
from medfed.audit.verify import read_entries, verify_run
from medfed.cli import main
from medfed.config import build_config
from medfed.engine import run
from medfed.topologies import gossip
from tests.audit.conftest import tamper
from tests.conftest import make_federation

SITES = ["site0", "site1", "site2"]
TINY_FEDISCA = {
    "synthesis_iterations": 2,
    "batch_size": 4,
    "rounds": 1,
    "snapshot_every": 1,
    "distill_lr": 0.01,
}

pytestmark = pytest.mark.usefixtures("one_thread")


def p2p_config(paradigm: str, *, rounds: int = 2, faults: tuple[dict, ...] = ()):
    model = "medfed:smallcnn" if paradigm == "one_shot" else "medfed:tinycnn"  # FedISCA needs BN
    return build_config(
        {"faults": list(faults), "one_shot": {"fedisca": TINY_FEDISCA}},
        [
            f"paradigm={paradigm}",
            f"federation.rounds={rounds}",
            "federation.min_clients=1",
            f"model.name={model}",
            "train.batch_size=16",
            "train.max_steps=2",
            "device=cpu",
        ],
    )


def _run(out: Path, paradigm: str, **kw) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = p2p_config(paradigm, **kw)
        run(config, out_dir=out, federation=make_federation(3, n=24), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Path]:
    """One run per paradigm; in the cyclic one site1's model is rejected in cycle 1."""
    root = tmp_path_factory.mktemp("p2p")
    nan = ({"site": "site1", "kind": "nan", "rounds": [1]},)
    return {
        "cyclic": _run(root / "cyclic", "cyclic", faults=nan),
        "gossip": _run(root / "gossip", "gossip"),
        "one_shot": _run(root / "one_shot", "one_shot", rounds=1),
    }


@pytest.fixture
def copy_of(finished, tmp_path):
    def make(paradigm: str, name: str = "") -> Path:
        return Path(shutil.copytree(finished[paradigm], tmp_path / (name or paradigm)))

    return make


def spec_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The tensor digest written out from medfed.audit.canonical's docstring, with numpy."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = tensors[name].contiguous().numpy()
        dtype = str(tensors[name].dtype).removeprefix("torch.")
        head = json.dumps([name, dtype, list(arr.shape), arr.nbytes], separators=(",", ":"))
        h.update(head.encode() + b"\n" + arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def updates(run_dir: Path) -> list:
    return [e for e in read_entries(run_dir / LEDGER_FILE) if e.kind == EntryKind.UPDATE]


def group(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix(prefix): v for k, v in load_file(str(path)).items() if k.startswith(prefix)
    }


# --- a clean run verifies ---


@pytest.mark.parametrize("paradigm", ["cyclic", "gossip", "one_shot"])
def test_each_paradigm_writes_a_ledger_that_verifies(finished, paradigm, capsys):
    run_dir = finished[paradigm]
    v = verify_run(run_dir)
    assert v.ok, [p.describe() for p in v.problems]
    assert v.paradigm == paradigm and len(v.replicas) == 3
    assert v.rounds == (1 if paradigm == "one_shot" else 2)
    assert main(["ledger", "verify", str(run_dir)]) == 0
    assert main(["ledger", "show", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert f"paradigm {paradigm}" in shown
    assert ("hops" in shown) == (paradigm == "cyclic") and ("steps" in shown) == (
        paradigm == "gossip"
    )


def test_cyclic_hops_chain_from_the_initial_model_and_skip_the_rejected_site(finished):
    run_dir = finished["cyclic"]
    hops = [e.data for e in updates(run_dir)]
    # cycle 0: site0 -> site1 -> site2; cycle 1: site1 sends NaN and is skipped
    assert [(h["round"], h["hop"], h["site"], h["sender"], h["receiver"]) for h in hops] == [
        (0, 0, "site0", None, "site1"),
        (0, 1, "site1", "site0", "site2"),
        (0, 2, "site2", "site1", "site0"),  # to the next cycle's first site
        (1, 0, "site0", "site2", "site1"),
        (1, 2, "site2", "site0", None),
    ]
    for before, after in zip(hops, hops[1:], strict=False):
        assert after["start_digest"] == before["digest"]
    start = read_entries(run_dir / LEDGER_FILE)[0].data
    assert hops[0]["start_digest"] == start["initial_digest"]
    rounds = round_rows(read_entries(run_dir / LEDGER_FILE))
    assert [r.topology for r in rounds] == ["cyclic", "cyclic"]
    assert rounds[1].sites[1].status.startswith("rejected") and len(rounds[1].handovers) == 2


def test_cyclic_digests_equal_the_checkpoint_and_final_files(finished):
    run_dir = finished["cyclic"]
    entries = read_entries(run_dir / LEDGER_FILE)
    hops = [e.data for e in entries if e.kind == EntryKind.UPDATE]
    last_round = [e.data for e in entries if e.kind == EntryKind.ROUND][-1]
    ckpt = run_dir / "checkpoints" / "round_0001"
    assert spec_digest(group(ckpt / "strategy.safetensors", "carry/")) == hops[-1]["digest"]
    for site in SITES:
        own = [h["digest"] for h in hops if h["site"] == site][-1]
        assert spec_digest(group(ckpt / "sites" / f"{site}.safetensors", "model/")) == own
    assert (
        spec_digest(load_file(str(ckpt / "global.safetensors"))) == last_round["aggregate_digest"]
    )
    end = entries[-1].data
    assert entries[-1].kind == EntryKind.RUN_END
    assert spec_digest(load_file(str(run_dir / "final.safetensors"))) == end["final_digest"]


def test_gossip_steps_name_the_versions_they_merged_and_match_the_checkpoint(finished):
    run_dir = finished["gossip"]
    steps = [e.data for e in updates(run_dir)]
    # replay the version bookkeeping from the ledger alone, as a third party would
    latest = {s: (0, steps[0]["from_digest"]) for s in SITES}
    for s in steps:
        assert (s["from_version"], s["from_digest"]) == latest[s["site"]]
        for m in s["merged"]:
            assert (m["version"], m["digest"]) == latest[m["site"]]
        latest[s["site"]] = (s["version"], s["digest"])
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps)
    ckpt = run_dir / "checkpoints" / "round_0001"
    for site in SITES:
        meta = group(ckpt / "sites" / f"{site}.safetensors", "meta/")
        assert int(meta[gossip.VersionSlot.VERSION].item()) == latest[site][0]
        model = group(ckpt / "sites" / f"{site}.safetensors", "model/")
        assert spec_digest(model) == latest[site][1]
    rounds = [e.data for e in read_entries(run_dir / LEDGER_FILE) if e.kind == EntryKind.ROUND]
    assert rounds[-1]["versions"] == {s: v for s, (v, _) in latest.items()}


def test_one_shot_records_each_upload_and_the_distilled_student(finished):
    run_dir = finished["one_shot"]
    entries = read_entries(run_dir / LEDGER_FILE)
    assert [e.kind for e in entries] == [
        "run_start",
        "update",
        "update",
        "update",
        "round",
        "run_end",
    ]
    for e in entries[1:4]:
        d, site = e.data, e.signer
        teacher = run_dir / "sites" / site
        assert d["digest"] == spec_digest(load_file(str(teacher / "final.safetensors")))
        assert d["teacher_ledger_head"] == read_entries(teacher / LEDGER_FILE)[-1].hash
        (path, sha) = d["teacher_file"].popitem()
        assert sha == hashlib.sha256((run_dir / path).read_bytes()).hexdigest()
    distill = entries[4].data
    assert distill["aggregate_digest"] == spec_digest(load_file(str(run_dir / "final.safetensors")))
    assert distill["distill"]["fedisca"]["synthesis_iterations"] == 2
    assert distill["update_digests"] == {e.signer: e.data["digest"] for e in entries[1:4]}


def test_the_report_block_names_each_ledgers_paradigm_and_the_teachers(finished, tmp_path):
    from medfed.report.ledger_view import ledger_html, ledger_rows

    study = tmp_path / "study"
    for name in ("cyclic", "one_shot"):
        shutil.copytree(finished[name], study / "runs" / "net0" / name)
    rows = {r.run: (r.paradigm, r.ok) for r in ledger_rows(study)}
    assert rows == {
        "runs/net0/cyclic": ("cyclic", True),
        "runs/net0/one_shot": ("one_shot", True),
        **{f"runs/net0/one_shot/sites/{s}": ("one_shot teacher", True) for s in SITES},
    }
    html = ledger_html(study)
    assert "<th>paradigm</th>" in html and html.count("one_shot teacher") == 3


# --- tampering is detected and named ---


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("paradigm", "file", "kind"),
    [
        ("cyclic", "final.safetensors", "run_end"),
        ("cyclic", "checkpoints/round_0000/sites/site1.safetensors", "checkpoint"),
        ("gossip", "checkpoints/round_0001/global.safetensors", "checkpoint"),
        ("one_shot", "sites/site2/final.safetensors", "run_end"),
    ],
)
def test_a_flipped_byte_in_a_stored_model_names_its_entry(copy_of, paradigm, file, kind):
    run_dir = copy_of(paradigm)
    flip_byte(run_dir / file)
    v = verify_run(run_dir)
    entries = read_entries(run_dir / LEDGER_FILE)
    (p,) = v.problems
    assert (p.issue, p.kind, entries[p.index].kind) == (Issue.CHECKPOINT_MISMATCH, kind, kind)
    assert Path(file).name in p.detail


@pytest.mark.parametrize("paradigm", ["cyclic", "gossip", "one_shot"])
def test_a_deleted_or_reordered_entry_is_named(copy_of, paradigm):
    run_dir = copy_of(paradigm)
    db = run_dir / LEDGER_FILE
    i = next(e.index for e in read_entries(db) if e.kind == EntryKind.UPDATE) + 1
    tamper(db, ("DELETE FROM entries WHERE idx = ?", (i,)))
    first = verify_run(run_dir, include_default=False).first
    assert first is not None and (first.index, first.issue) == (i, Issue.MISSING)

    run_dir = copy_of(paradigm, f"{paradigm}-swap")
    db = run_dir / LEDGER_FILE
    tamper(  # swap entries i and i + 1, keeping each one's stored index
        db,
        ("UPDATE entries SET idx = -1 WHERE idx = ?", (i,)),
        ("UPDATE entries SET idx = ? WHERE idx = ?", (i, i + 1)),
        ("UPDATE entries SET idx = ? WHERE idx = -1", (i + 1,)),
    )
    first = verify_run(run_dir, include_default=False).first
    assert first is not None and first.index == i


@pytest.mark.parametrize(
    ("paradigm", "edit"),
    [
        ("cyclic", lambda d: d | {"receiver": "site0"}),
        ("gossip", lambda d: d | {"version": d["version"] + 1}),
        ("one_shot", lambda d: d | {"num_examples": d["num_examples"] * 10}),
    ],
)
def test_an_edited_signed_field_fails_the_sites_signature(copy_of, paradigm, edit):
    """The attacker rewrites a site entry's body and its stored hash; the site's key did not sign
    it, so the entry is named (and replicas still hold the original)."""
    run_dir = copy_of(paradigm)
    db = run_dir / LEDGER_FILE
    e = updates(run_dir)[1]
    body = canonical_json(edit(e.data))
    forged = make_entry(
        index=e.index, prev=e.prev, kind=EntryKind.UPDATE, signer=e.signer, body=body,
        signature=e.signature,
    )  # fmt: skip
    tamper(
        db,
        (
            "UPDATE entries SET body = ?, hash = ? WHERE idx = ?",
            (body.decode(), forged.hash, e.index),
        ),
    )
    v = verify_run(run_dir)
    assert (v.first.index, v.first.issue) == (e.index, Issue.BAD_SIGNATURE)
    assert main(["ledger", "verify", str(run_dir)]) == 1


def test_an_orchestrator_that_drops_a_hop_and_re_signs_is_caught_by_the_lineage(copy_of):
    """With the coordinator key, the chain can be rebuilt coherently without site1's hop; the
    sites' own signed hand-overs no longer connect, and the next hop is named."""
    run_dir = copy_of("cyclic")
    db = run_dir / LEDGER_FILE
    key = load_private_key(run_dir / "keys" / f"{COORDINATOR}.key")
    old = read_entries(db)
    dropped = next(e for e in old if e.kind == EntryKind.UPDATE and e.signer == "site1")
    new = []
    for e in old:
        if e.index == dropped.index:
            continue
        body = e.body
        if e.kind == EntryKind.ROUND and e.data["round"] == dropped.data["round"]:
            d = e.data
            d["update_digests"].pop("site1")
            d["included"].remove("site1")
            body = canonical_json(d)
        mine = e.signer == COORDINATOR
        new.append(
            make_entry(
                index=len(new),
                prev=new[-1].hash if new else GENESIS,
                kind=EntryKind(e.kind),
                signer=e.signer,
                body=body,
                signature=None if mine else e.signature,
                key=key if mine else None,
            )
        )
    db.unlink()
    store = SqliteChain(db)
    store.append(new)
    store.close()
    v = verify_run(run_dir, include_default=False)
    assert v.first is not None
    assert (v.first.index, v.first.issue) == (dropped.index, Issue.OUT_OF_ORDER)
    assert "dropped, reordered or forged" in v.first.detail
    assert new[dropped.index].signer == "site2"


# --- resume appends ---


class _Crash(RuntimeError):
    pass


def test_a_resumed_gossip_run_appends_and_verifies(tmp_path, monkeypatch):
    """Round 1 is recorded, then the process dies before its checkpoint: the chain keeps the
    crashed attempt's entries, rolls the version story back to round 0 and verifies clean."""
    import medfed.peer as peer

    real = peer.save_checkpoint

    def dies_at_round_1(*args, **kw):
        if kw["round_idx"] == 1:
            raise _Crash()
        return real(*args, **kw)

    monkeypatch.setattr(peer, "save_checkpoint", dies_at_round_1)
    config = p2p_config("gossip")
    fed = make_federation(3, n=24)
    with pytest.raises(_Crash):
        run(config, out_dir=tmp_path, federation=fed, progress=False)
    crashed = [e.hash for e in read_entries(tmp_path / LEDGER_FILE)]
    monkeypatch.setattr(peer, "save_checkpoint", real)
    run(config, out_dir=tmp_path, federation=fed, progress=False, resume=True)
    v = verify_run(tmp_path)
    assert v.ok, [p.describe() for p in v.problems]
    entries = read_entries(tmp_path / LEDGER_FILE)
    assert [e.hash for e in entries[: len(crashed)]] == crashed  # appended, never rewritten
    resume = [e.data for e in entries if e.kind == EntryKind.RESUME]
    assert len(resume) == 1 and resume[0]["superseded_rounds"] == [1]
    rows = round_rows(entries)
    assert [(r.round, r.superseded) for r in rows] == [(0, False), (1, True), (1, False)]


def test_a_one_shot_run_that_died_in_distillation_resumes_and_every_ledger_verifies(
    tmp_path, monkeypatch
):
    """The finished teachers are re-entered (their ledgers are reopened and end again), the
    uploads are signed again after a resume entry, and the chain that holds the dead attempt's
    run start is extended, not rewritten."""
    import medfed.one_shot as one_shot

    real = one_shot.one_shot

    def dies(*args, **kw):
        raise _Crash()

    monkeypatch.setattr(one_shot, "one_shot", dies)
    config = p2p_config("one_shot", rounds=1)
    fed = make_federation(3, n=24)
    with pytest.raises(_Crash):
        run(config, out_dir=tmp_path, federation=fed, progress=False)
    crashed = [e.hash for e in read_entries(tmp_path / LEDGER_FILE)]
    assert len(crashed) == 1  # run_start only: the uploads land with the distillation entry
    monkeypatch.setattr(one_shot, "one_shot", real)
    run(config, out_dir=tmp_path, federation=fed, progress=False, resume=True)
    for run_dir in [tmp_path, *(tmp_path / "sites" / s for s in SITES)]:
        v = verify_run(run_dir)
        assert v.ok, (run_dir, [p.describe() for p in v.problems])
    entries = read_entries(tmp_path / LEDGER_FILE)
    assert entries[0].hash == crashed[0]
    assert [e.kind for e in entries] == ["run_start", "resume", *["update"] * 3, "round", "run_end"]
    teacher = [e.kind for e in read_entries(tmp_path / "sites" / "site0" / LEDGER_FILE)]
    assert teacher[-3:] == ["run_end", "resume", "run_end"]
    assert (
        entries[2].data["teacher_ledger_head"]
        == read_entries(tmp_path / "sites" / "site0" / LEDGER_FILE)[-1].hash
    )
