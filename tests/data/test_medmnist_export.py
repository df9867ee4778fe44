"""Synthetic federation -> MedMNIST .npz: layout, resizing, and a round trip through the reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from medfed.cli import main
from medfed.data.site import ArrayDataset, Federation, Site
from medfed.data.sources.medmnist import load_medmnist
from medfed.data.sources.options import ImageOptions, MedMnistSource
from medfed.data.synthetic.medmnist_export import (
    medmnist_arrays,
    medmnist_images,
    write_medmnist,
)
from medfed.data.synthetic.ultrasound import UltrasoundOptions, synthesize_federation


def _data(labels: list[int], *, c: int = 1, size: int = 4, start: int = 0) -> ArrayDataset:
    n = len(labels)
    pix = (torch.arange(n * c * size * size) + start) % 256
    return ArrayDataset(
        images=pix.reshape(n, c, size, size).to(torch.uint8),
        labels=torch.tensor(labels, dtype=torch.int64),
    )


def _fed(*, c: int = 1, external: bool = True) -> Federation:
    a = Site("a", _data([0, 1, 1], c=c), _data([1], c=c, start=7))
    b = Site("b", _data([2, 0], c=c, start=3), _data([0, 2], c=c, start=11))
    ext = _data([1, 0, 2], c=c, start=5)
    return Federation((a, b), Site("ext", ext.subset([]), ext) if external else None)


def test_layout_matches_medmnist_and_splits_map_to_sites() -> None:
    fed = _fed()
    arrays = medmnist_arrays(fed, size=4)
    assert sorted(arrays) == sorted(f"{s}_{k}" for s in ("train", "val", "test")
                                    for k in ("images", "labels"))  # fmt: skip
    assert arrays["train_images"].shape == (5, 4, 4) and arrays["train_images"].dtype == np.uint8
    assert arrays["train_labels"].shape == (5, 1) and arrays["train_labels"].dtype == np.uint8
    # train = site a's train then site b's train; test = the external site
    assert arrays["train_labels"][:, 0].tolist() == [0, 1, 1, 2, 0]
    assert arrays["val_labels"][:, 0].tolist() == [1, 0, 2]
    assert arrays["test_labels"][:, 0].tolist() == [1, 0, 2]
    np.testing.assert_array_equal(arrays["train_images"][3], fed.sites[1].train.images[0, 0])
    np.testing.assert_array_equal(arrays["test_images"], fed.external.val.images[:, 0])


def test_rgb_is_channels_last_and_no_external_gives_empty_test() -> None:
    fed = _fed(c=3, external=False)
    arrays = medmnist_arrays(fed, size=4)
    assert arrays["train_images"].shape == (5, 4, 4, 3)
    # pixel (row 1, col 2) of channel 2 of the first image: 2*16 + 1*4 + 2
    assert arrays["train_images"][0, 1, 2, 2] == 38
    assert arrays["test_images"].shape == (0, 4, 4, 3) and arrays["test_labels"].shape == (0, 1)


def test_resize_matches_pillow_antialiased_bilinear() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    ours = medmnist_images(torch.from_numpy(img)[None, None], size=28)[0]
    ref = np.asarray(Image.fromarray(img).resize((28, 28), Image.Resampling.BILINEAR))
    assert ours.shape == (28, 28)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


@settings(max_examples=25, deadline=None)
@given(value=st.integers(0, 255), size=st.integers(8, 40), out=st.integers(1, 32))
def test_constant_image_stays_constant(value: int, size: int, out: int) -> None:
    img = torch.full((2, 1, size, size), value, dtype=torch.uint8)
    res = medmnist_images(img, size=out)
    assert res.shape == (2, out, out) and np.all(res == value)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        medmnist_images(torch.zeros((1, 1, 4, 4)), size=4)
    big = Site("a", _data([0, 300]), _data([1]))
    with pytest.raises(ValueError, match="train: label 300"):
        medmnist_arrays(Federation((big,)), size=4)
    with pytest.raises(ValueError, match="missing MedMNIST arrays"):
        write_medmnist(tmp_path / "x.npz", {"train_images": np.zeros((1, 2, 2), np.uint8)})


def test_round_trip_through_the_medmnist_source(tmp_path: Path) -> None:
    fed = _fed()
    path = write_medmnist(tmp_path / "tiny.npz", medmnist_arrays(fed, size=4))
    spec = MedMnistSource(path=path, use=["train", "val", "test"])
    data = load_medmnist(spec, image=ImageOptions(size=4, intensity="none"))
    assert data.split == ("train",) * 5 + ("val",) * 3 + ("test",) * 3
    assert data.images.dtype == torch.uint8 and data.images.shape == (11, 1, 4, 4)
    want = torch.cat([fed.pooled_train().images, fed.pooled_val().images, fed.external.val.images])
    assert torch.equal(data.images, want)
    assert data.labels.tolist() == [0, 1, 1, 2, 0, 1, 0, 2, 1, 0, 2]
    assert data.label_names == ("0", "1", "2")


def test_cli_writes_the_generator_federation(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path / "cache"))
    sets = ["--set", "scale=0.005", "--set", "num_sites=2", "--set", "image_size=32"]
    out = tmp_path / "mm"
    args = ["data", "synth", "ultrasound", "--format", "medmnist", "--size", "16", "--out"]
    assert main([*args, str(out), *sets]) == 0
    fed = synthesize_federation(
        UltrasoundOptions(scale=0.005, num_sites=2, image_size=32), cache_dir=tmp_path / "cache"
    )
    spec = MedMnistSource(path=out / "ultrasoundmnist.npz", use=["train", "val", "test"])
    data = load_medmnist(spec, image=ImageOptions(size=16, intensity="none"))
    assert fed.external is not None
    want = [fed.pooled_train().labels, fed.pooled_val().labels, fed.external.val.labels]
    assert data.labels.tolist() == torch.cat(want).tolist()
    assert data.images.shape[1:] == (1, 16, 16)
    assert data.split.count("test") == len(fed.external.val)


def test_the_preset_deals_the_npz_to_five_label_skewed_sites(tmp_path: Path) -> None:
    from medfed.build import load_federation
    from medfed.config import load_config

    rng = np.random.default_rng(0)
    train = _data(rng.permutation([0] * 80 + [1] * 80).tolist(), size=28)
    val = _data(rng.permutation([0] * 20 + [1] * 20).tolist(), size=28, start=1)
    ext = _data([0, 1] * 5, size=28, start=2)
    fed = Federation((Site("a", train, val),), Site("e", ext.subset([]), ext))
    path = write_medmnist(tmp_path / "m.npz", medmnist_arrays(fed, size=28))
    preset = Path(__file__).parents[2] / "configs" / "one-shot-medmnist.yaml"
    cfg = load_config(preset, [f"data.files.pooled.path={path}",
                               f"data.files.external.source.path={path}"])  # fmt: skip
    built, _ = load_federation(cfg.data)
    assert len(built.sites) == 5 and built.external is not None
    assert built.external.val.labels.tolist() == [0, 1] * 5
    # every pooled case lands at exactly one site and keeps the npz's own train / val split
    assert sum(len(s.train) for s in built.sites) == 160
    assert sum(len(s.val) for s in built.sites) == 40
    counts = np.array([s.train.class_counts() + s.val.class_counts() for s in built.sites])
    assert counts[:, [0, 2]].sum() == 100 and counts[:, [1, 3]].sum() == 100
    # label skew: alpha 0.5 makes the sites' malignant shares differ widely (IID would not)
    share = (counts[:, 1] + counts[:, 3]) / counts.sum(axis=1)
    assert share.max() - share.min() > 0.3
