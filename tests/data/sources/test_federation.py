"""build_files_federation: patient-level splits, pooled partitions, external site, config checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from medfed.data.sources.errors import DataError
from medfed.data.sources.federation import FilesDataConfig, build_files_federation


def _site_csv(
    root: Path, name: str, n_patients: int, write_csv: Any, gray_png: Any, **extra: str
) -> Path:
    (root / name).mkdir()
    rows = []
    for p in range(n_patients):
        for k in range(3):  # three images per patient
            f = gray_png(root / name / f"{p}_{k}.png", (7 * p + k) % 250)
            rows.append({"path": f.name, "label": ["benign", "malignant"][p % 2],
                         "patient_id": f"{name}-p{p}", **extra})  # fmt: skip
    return write_csv(root / name / "m.csv", rows)


def test_sites_split_by_patient_and_external(tmp_path: Path, write_csv: Any, gray_png: Any) -> None:
    a = _site_csv(tmp_path, "a", 10, write_csv, gray_png)
    b = _site_csv(tmp_path, "b", 8, write_csv, gray_png)
    ext = _site_csv(tmp_path, "ext", 4, write_csv, gray_png)
    cfg = FilesDataConfig.model_validate({
        "sites": [{"name": "a", "source": {"kind": "image_csv", "manifest": str(a)}},
                  {"name": "b", "source": {"kind": "image_csv", "manifest": str(b)}}],
        "external": {"name": "ext", "source": {"kind": "image_csv", "manifest": str(ext)}},
        "image": {"size": 16}, "val_fraction": 0.3,
    })  # fmt: skip
    fed, report = build_files_federation(cfg)
    assert fed.names == ["a", "b"] and fed.external is not None
    for site in fed:
        train = {c.split("_")[0] for c in site.train.case_ids}
        val = {c.split("_")[0] for c in site.val.case_ids}
        assert train and val and not train & val  # no patient on both sides
        assert len(site.train) + len(site.val) == (30 if site.name == "a" else 24)
    assert len(fed.external.train) == 0 and len(fed.external.val) == 12
    assert report.label_names == ("benign", "malignant")
    assert [s.name for s in report.sites] == ["a", "b", "ext"]
    assert report.sites[0].class_counts == {"benign": 15, "malignant": 15}


def test_split_column_is_used_and_classes_agree(
    tmp_path: Path, write_csv: Any, gray_png: Any
) -> None:
    a = _site_csv(tmp_path, "a", 4, write_csv, gray_png, split="train")
    b = _site_csv(tmp_path, "b", 2, write_csv, gray_png, split="val")
    cfg = FilesDataConfig.model_validate({
        "sites": [{"name": "a", "source": {"kind": "image_csv", "manifest": str(a)}},
                  {"name": "b", "source": {"kind": "image_csv", "manifest": str(b),
                                           "classes": ["benign", "malignant"]}}],
        "image": {"size": 8}})  # fmt: skip
    fed, _ = build_files_federation(cfg)
    assert len(fed.site("a").train) == 12 and len(fed.site("a").val) == 0
    assert len(fed.site("b").val) == 6


def test_pooled_medmnist_dirichlet_covers_all(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 120), ("val", 30)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 4, (n, 1))
    np.savez(tmp_path / "p.npz", **arrays)
    cfg = FilesDataConfig.model_validate({
        "pooled": {"kind": "medmnist", "path": str(tmp_path / "p.npz")},
        "partition": {"kind": "dirichlet", "num_sites": 4, "alpha": 0.5, "seed": 1},
        "image": {"size": 28}})  # fmt: skip
    fed, report = build_files_federation(cfg)
    assert len(fed.sites) == 4
    ids = [c for s in fed for c in s.train.case_ids + s.val.case_ids]
    assert len(ids) == 150 and len(set(ids)) == 150  # every case in exactly one site
    for s in fed:  # npz split column decides train / val
        assert all(":train:" in c for c in s.train.case_ids)
        assert all(":val:" in c for c in s.val.case_ids)
    assert sum(r.n_train + r.n_val for r in report.sites) == 150


def test_config_validation_and_errors_before_training(tmp_path: Path, write_csv: Any) -> None:
    src = {"kind": "image_csv", "manifest": str(tmp_path / "m.csv")}
    with pytest.raises(ValidationError, match="either sites .* or pooled"):
        FilesDataConfig.model_validate({"sites": [{"name": "a", "source": src}], "pooled": src,
                                        "partition": {"kind": "iid", "num_sites": 2}})  # fmt: skip
    with pytest.raises(ValidationError, match="give sites"):
        FilesDataConfig.model_validate({"pooled": src})
    with pytest.raises(ValidationError, match="extra|Extra"):
        FilesDataConfig.model_validate({"sites": [{"name": "a", "source": {**src, "rot": 1}}]})
    write_csv(tmp_path / "m.csv", [{"path": "missing.png", "label": "a"}])
    cfg = FilesDataConfig.model_validate({"sites": [{"name": "a", "source": src}]})
    with pytest.raises(DataError, match="row 2: .*missing.png: file not found"):
        build_files_federation(cfg)
