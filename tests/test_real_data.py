"""Real files end to end: PNG folders with CSV manifests and a MedMNIST .npz, through the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medfed.cli import main


def _site_folder(root: Path, name: str, *, n: int, seed: int) -> Path:
    """A hospital's export: 16-bit PNGs (bright blob = malignant), several images per patient."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    rows = ["path,label,patient_id"]
    for i in range(n):
        label = "malignant" if i % 2 else "benign"
        img = rng.normal(20000, 4000, size=(24, 20))
        if label == "malignant":
            img[6:14, 6:14] += 15000
        Image.fromarray(np.clip(img, 0, 65535).astype(np.uint16)).save(folder / f"img{i:03d}.png")
        rows.append(f"img{i:03d}.png,{label},{name}-p{i // 3}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


def _config(tmp_path: Path, sites: dict[str, Path]) -> Path:
    cfg = {
        "name": "real",
        "device": "cpu",
        "data": {
            "source": "files",
            "files": {
                "sites": [
                    {
                        "name": k,
                        "source": {"kind": "image_csv", "manifest": str(v / "manifest.csv")},
                    }
                    for k, v in sites.items()
                ],
                "image": {"size": 16},
            },
        },
        "model": {"name": "medfed:tinycnn"},
        "train": {"batch_size": 8},
        "federation": {"rounds": 2, "min_clients": 2},
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_run_on_png_sites_with_patient_level_splits(tmp_path):
    sites = {f"h{i}": _site_folder(tmp_path / "data", f"h{i}", n=30, seed=i) for i in (1, 2)}
    out = tmp_path / "run"
    assert main(["run", str(_config(tmp_path, sites)), "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["data_skipped"] == 0
    report = {s["name"]: s for s in summary["data"]["sites"]}
    assert report["h1"]["n_train"] + report["h1"]["n_val"] == 30
    assert summary["data"]["label_names"] == ["benign", "malignant"]
    # patient-level split: no patient's images on both sides (patients from the manifests)
    from medfed.build import build_federation
    from medfed.config import load_config

    fed = build_federation(load_config(out / "config.yaml"))
    for site in fed.sites:
        rows = (sites[site.name] / "manifest.csv").read_text().splitlines()[1:]
        patient = {r.split(",")[0]: r.split(",")[2] for r in rows}
        train_p = {patient[c] for c in site.train.case_ids}
        val_p = {patient[c] for c in site.val.case_ids}
        assert train_p and val_p and not train_p & val_p


@pytest.mark.slow
def test_on_error_skip_counts_the_bad_file_and_raise_names_it(tmp_path, capsys):
    sites = {f"h{i}": _site_folder(tmp_path / "data", f"h{i}", n=24, seed=i) for i in (1, 2)}
    (sites["h2"] / "img005.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = _config(tmp_path, sites)
    assert main(["run", str(cfg), "--quiet", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "img005.png" in err and "Traceback" not in err
    assert not (tmp_path / "a" / "history.jsonl").exists()  # failed before training started
    code = main(
        [
            "run",
            str(cfg),
            "--quiet",
            "--out",
            str(tmp_path / "b"),
            "--set",
            "data.files.on_error=skip",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["data_skipped"] == 1


def test_data_check_reports_problems_and_exit_code(tmp_path, capsys):
    folder = _site_folder(tmp_path, "h1", n=9, seed=0)
    assert main(["data", "check", str(folder / "manifest.csv"), "--json"]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["ok"] is True
    (folder / "img004.png").unlink()  # listed in the manifest, gone from disk
    assert main(["data", "check", str(folder / "manifest.csv"), "--json"]) == 1
    bad = json.loads(capsys.readouterr().out)
    assert bad["ok"] is False
    assert any("img004.png" in json.dumps(f) for f in bad["findings"])
    assert main(["data", "check", str(folder / "manifest.csv")]) == 1  # rich table, no crash


def test_files_section_requires_source_files(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": "files"}}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "needs a files section" in capsys.readouterr().err


@pytest.mark.slow
def test_medmnist_npz_runs_federated_through_a_dirichlet_partition(tmp_path):
    """A local MedMNIST-format file (never downloaded), split into 3 label-skewed sites."""
    rng = np.random.default_rng(0)

    def part(n):
        y = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
        x = rng.integers(0, 120, size=(n, 28, 28)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 8:20] += 100
        return x, y

    arrays = {}
    for split, n in (("train", 120), ("val", 30), ("test", 30)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = part(n)
    np.savez(tmp_path / "fakemnist.npz", **arrays)
    cfg = {
        "device": "cpu",
        "data": {
            "source": "files",
            "files": {
                "pooled": {"kind": "medmnist", "path": str(tmp_path / "fakemnist.npz")},
                "partition": {"kind": "dirichlet", "num_sites": 3, "alpha": 0.5},
                "image": {"size": 28},
            },
        },
        "model": {"name": "medfed:tinycnn"},
        "train": {"batch_size": 16},
        "federation": {"rounds": 1, "min_clients": 3},
    }
    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(path), "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sites = summary["data"]["sites"]
    assert len(sites) == 3
    assert sum(s["n_train"] + s["n_val"] + s["n_test"] for s in sites) == 150  # train + val used
