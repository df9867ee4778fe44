"""3-D segmentation: volumes (N, C, D, H, W) train federated with a 3-D U-Net, through the same
engine, evaluation and study as 2-D images."""

import json

import pytest
import torch

from medfed.config import build_config
from medfed.data.site import ArrayDataset
from medfed.engine import build_model, run
from medfed.study import build_study_config, run_study
from tests.conftest import make_seg_volume_federation

pytestmark = pytest.mark.slow

SETTINGS = [
    "task=segmentation",
    "model.name=medfed:smallunet",
    "train.batch_size=4",
    "train.optimizer=adam",
    "train.lr=0.01",
    "device=cpu",
]


def test_volumes_build_a_3d_network_and_learn_federated(tmp_path):
    fed = make_seg_volume_federation()
    config = build_config({}, [*SETTINGS, "federation.rounds=3", "train.epochs=2"])
    model = build_model(config, fed)
    assert any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    res = run(config, out_dir=tmp_path, federation=fed, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["val"]["dice"] > 0.5, rows[-1]["val"]
    # the pooled counts cover every validation voxel
    n_val = sum(len(s.val) for s in fed.sites)
    assert res.summary["val"]["pixel_acc"] <= 1.0 and n_val > 0


def test_a_3d_segmentation_study_draws_slices_for_its_overlays(tmp_path):
    raw = {
        "name": "vol",
        "task": "segmentation",
        "device": "cpu",
        "networks": [{"label": "UNet3D", "model": {"name": "medfed:smallunet"}}],
        "paradigms": ["centralized", "federated"],
        "budget": {"pooled_epochs": 2},
        "federation": {"rounds": 1},
        "train": {"batch_size": 4, "optimizer": "adam", "lr": 0.01},
        "stats": {"bootstrap_resamples": 50, "hd95": True},
    }
    result = run_study(
        build_study_config(raw),
        out_dir=tmp_path,
        federation=make_seg_volume_federation(),
        progress=False,
    )
    doc = result.results
    assert (
        doc["UNet3D"]["federated"]["internal"]["n_pixels"]
        == 16**3 * doc["UNet3D"]["federated"]["internal"]["n"]
    )
    png = (tmp_path / doc["meta"]["overlays"]["UNet3D"]).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_masks_must_match_their_images():
    images = torch.zeros(2, 1, 4, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"masks \(2, 8, 8\) do not match images"):
        ArrayDataset(images=images, labels=torch.zeros(2, dtype=torch.long),
                     masks=torch.zeros(2, 8, 8, dtype=torch.uint8))  # fmt: skip
    with pytest.raises(ValueError, match="images must be"):
        ArrayDataset(images=torch.zeros(2, 8, 8), labels=torch.zeros(2, dtype=torch.long))


def test_nifti_volumes_on_disk_train_a_federated_3d_segmentation(tmp_path):
    """Real-format input end to end: per-site NIfTI volumes + masks (mode: volume), resampled
    to one size, federated 3-D U-Net, Dice from counts."""
    import nibabel as nib
    import numpy as np

    from medfed.cli import main

    rng = np.random.default_rng(0)
    sites = {}
    for site in ("a", "b"):
        rows = ["path,label,mask_path"]
        for i in range(8):
            vol = rng.normal(100, 20, size=(20, 20, 12)).astype(np.float32)
            mask = np.zeros(vol.shape, dtype=np.uint8)
            if i % 2:
                x, y, z = rng.integers(2, 10, size=3)
                mask[x : x + 8, y : y + 8, z % 4 : z % 4 + 6] = 1
                vol[mask == 1] += 120
            for name, arr in ((f"v{i}.nii.gz", vol), (f"m{i}.nii.gz", mask)):
                nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / name)
            rows.append(f"v{i}.nii.gz,{i % 2},m{i}.nii.gz")
        manifest = tmp_path / f"{site}.csv"
        manifest.write_text("\n".join(rows) + "\n")
        sites[site] = manifest
    config = {
        "task": "segmentation",
        "device": "cpu",
        "data": {
            "source": "files",
            "files": {
                "sites": [
                    {
                        "name": s,
                        "source": {
                            "kind": "nifti",
                            "manifest": str(m),
                            "mode": "volume",
                            "volume_size": [16, 16, 16],
                        },
                    }  # fmt: skip
                    for s, m in sites.items()
                ],
                "val_fraction": 0.25,
            },
        },
        "model": {"name": "medfed:smallunet"},
        "train": {"batch_size": 2, "optimizer": "adam", "lr": 0.01, "epochs": 2},
        "federation": {"rounds": 2, "min_clients": 2},
    }
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert set(rows[-1]["site_val"]) == {"a", "b"}
    assert 0.0 <= rows[-1]["val"]["dice"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["sites"][0]["n_train"] == 6
