"""The command line as a user meets it: real subprocesses, real files, a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medfed.cli import main

ROOT = Path(__file__).parents[1]
TINY = [
    "data.ultrasound.scale=0.04",
    "data.ultrasound.num_sites=3",
    "data.ultrasound.image_size=32",
    "federation.min_clients=2",
    "train.batch_size=16",
    "device=cpu",
]


def _medfed(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medfed.cli", *args], capture_output=True, text=True, cwd=ROOT, **kw
    )


def _sets(tmp_path: Path, *extra: str) -> list[str]:
    out = []
    for s in [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *extra]:
        out += ["--set", s]
    return out


def test_config_typo_is_one_clear_line_without_traceback(tmp_path):
    proc = _medfed(
        "run",
        "configs/quickstart.yaml",
        "--set",
        "federation.strategy.name=fedavgg",
        "--out",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 2
    assert "federation.strategy" in proc.stderr and "unknown strategy 'fedavgg'" in proc.stderr
    assert "fedprox" in proc.stderr  # allowed values are listed
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing half-made


def test_kill_mid_run_then_resume_is_bit_identical(tmp_path):
    sets = _sets(tmp_path, "federation.rounds=4", "train.epochs=2")
    whole = tmp_path / "whole"
    assert main(["run", "configs/quickstart.yaml", *sets, "--out", str(whole), "--quiet"]) == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medfed.cli",
            "run",
            "configs/quickstart.yaml",
            *sets,
            "--out",
            str(cut),
            "--quiet",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "round_0001").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (cut / "final.safetensors").exists()

    res = _medfed("run", "--resume", str(cut), "--quiet")
    assert res.returncode == 0, res.stderr
    a = load_file(str(whole / "final.safetensors"))
    b = load_file(str(cut / "final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rounds = [json.loads(x)["round"] for x in (cut / "history.jsonl").read_text().splitlines()]
    assert rounds == list(range(4))


def test_resume_of_a_non_run_dir_is_a_clear_error(tmp_path):
    proc = _medfed("run", "--resume", str(tmp_path))
    assert proc.returncode == 1 and "not a run directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_synth_and_preview(tmp_path, monkeypatch):
    out = tmp_path / "us"
    sets = ["--set", "scale=0.02", "--set", "num_sites=2", "--set", "image_size=32"]
    assert main(["data", "synth", "ultrasound", "--out", str(out), *sets]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["sites"]) >= {"site1", "site2"}
    assert list(out.rglob("*.npz")) and (out / "preview.png").stat().st_size > 0
    png = tmp_path / "p.png"
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["data", "preview", "--out", str(png), *sets]) == 0
    assert list((tmp_path / "cache").rglob("*.npz"))  # the preview went through the cache
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("what,needle", [("strategies", "fedprox"), ("models", "timm:resnet50")])
def test_list(capsys, what, needle):
    assert main(["list", what]) == 0
    assert needle in capsys.readouterr().out


def _dicom_folder(tmp_path: Path) -> Path:
    import shutil

    import pydicom

    src = Path(pydicom.__file__).parent / "data" / "test_files"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(src / name, folder / name)
    return folder


def test_data_deid_end_to_end(tmp_path, capsys, monkeypatch):
    import pydicom

    monkeypatch.delenv("MEDFED_SITE_SECRET", raising=False)
    folder = _dicom_folder(tmp_path)
    before = pydicom.dcmread(folder / "CT_small.dcm")
    secret = tmp_path / "secret"
    secret.write_text("a-site-secret-of-enough-bytes\n")
    out = tmp_path / "out"
    assert main(["data", "deid", str(folder), str(out), "--site-secret-file", str(secret)]) == 0
    after = pydicom.dcmread(out / "CT_small.dcm")
    assert str(after.PatientName) != str(before.PatientName)
    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert after.PatientIdentityRemoved == "YES"
    assert after.PixelData == before.PixelData
    assert (out / "deid_audit.csv").is_file()
    assert pydicom.dcmread(folder / "CT_small.dcm").PatientName == before.PatientName  # input kept


def test_data_deid_refuses_without_secret_or_into_its_input(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDFED_SITE_SECRET", raising=False)
    folder = _dicom_folder(tmp_path)
    assert main(["data", "deid", str(folder), str(tmp_path / "o")]) == 1
    assert "site secret is required" in capsys.readouterr().err
    code = main(["data", "deid", str(folder), str(folder / "sub"), "--site-secret", "s" * 20])
    assert code == 1
    assert "Traceback" not in capsys.readouterr().err


def test_data_deid_rename_hides_file_and_folder_names(tmp_path, monkeypatch):
    import csv
    import shutil

    import pydicom

    monkeypatch.setenv("MEDFED_SITE_SECRET", "another-site-secret-value")
    src = Path(pydicom.__file__).parent / "data" / "test_files"
    folder = tmp_path / "in" / "Smith_John_1961"
    folder.mkdir(parents=True)
    shutil.copy(src / "CT_small.dcm", folder / "Smith_John_CT.dcm")
    shutil.copy(src / "MR_small.dcm", folder / "Smith_John_MR.dcm")
    out = tmp_path / "out"
    assert main(["data", "deid", str(tmp_path / "in"), str(out), "--rename"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm"))
    assert len(written) == 2 and all("/" not in w and "Smith" not in w for w in written)
    with (out / "deid_audit.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    mapped = {(r["input_path"], r["output_path"]) for r in rows if r["output_path"]}
    assert {o for _, o in mapped} == set(written)
    # the same secret and input give the same names again (stable across exports)
    again = tmp_path / "again"
    assert main(["data", "deid", str(tmp_path / "in"), str(again), "--rename"]) == 0
    assert sorted(p.name for p in again.glob("*.dcm")) == written


def test_flower_certs(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    out = tmp_path / "certs"
    assert main(["flower", "certs", str(out), "--nodes", "2", "--host", "superlink.example"]) == 0
    cert = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example"]
    serialization.load_ssh_private_key((out / "supernode-2").read_bytes(), password=None)
    assert main(["flower", "certs", str(out)]) == 1  # refuses to overwrite
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["flower", "superlink"], "--certs"),
        (["flower", "superlink", "--certs", "nope"], "nope/ca.crt"),
        (["flower", "supernode", "--superlink", "h:1", "--site", "a", "--site-data", "x.yaml"], "--ca"),
        (
            ["flower", "supernode", "--superlink", "h:1", "--site", "a", "--site-data", "x.yaml",
             "--ca", "ca.crt", "--key", "k"],
            "x.yaml",
        ),
        (["flower", "run", "c.yaml", "--superlink", "h:1", "--sites", "2"], "--ca"),
    ],
)  # fmt: skip
def test_flower_commands_check_their_inputs_before_starting_anything(
    tmp_path, monkeypatch, capsys, argv, needle
):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_flower_supernode_names_a_bad_site_config_field(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "site.yaml").write_text("data:\n  sourse: files\n")
    argv = ["flower", "supernode", "--superlink", "h:1", "--site", "a", "--site-data", "site.yaml"]
    assert main([*argv, "--ca", "ca.crt", "--key", "k"]) == 2
    assert "sourse" in capsys.readouterr().err


def test_flower_supernode_hands_its_he_context_to_the_clientapp(tmp_path, monkeypatch):
    """`--he-context` reaches the ClientApp as node config `he-context` (an absolute path);
    a missing file is refused before any process starts."""
    from medfed.runtime.flower import commands

    monkeypatch.chdir(tmp_path)
    (tmp_path / "site.yaml").write_text("data:\n  source: synthetic_ultrasound\n")
    (tmp_path / "he-secret.ctx").write_bytes(b"x")
    started: list[list[str]] = []
    monkeypatch.setattr(commands, "_foreground", lambda argv, **_: started.append(list(argv)) or 0)
    argv = ["flower", "supernode", "--superlink", "h:1", "--site", "a", "--site-data", "site.yaml"]
    assert main([*argv, "--insecure", "--he-context", "he-secret.ctx"]) == 0
    node_config = started[0][started[0].index("--node-config") + 1]
    assert f'he-context="{tmp_path / "he-secret.ctx"}"' in node_config
    assert main([*argv, "--insecure", "--he-context", "missing.ctx"]) != 0
    assert len(started) == 1
