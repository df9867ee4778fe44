"""Federated segmentation through the ordinary engine: Dice-CE training, sufficient-statistics
evaluation that equals MONAI's Dice on the pooled masks, and clear errors."""

import json

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from medfed.algorithms import STRATEGIES
from medfed.client.train import TrainOptions, predict_masks, train_local
from medfed.config import build_config
from medfed.engine import FederationError, run
from medfed.evaluation import Evaluator, Scorer
from medfed.types import Task
from tests.conftest import make_federation, make_seg_site_data

pytestmark = pytest.mark.slow


def cfg(*overrides, rounds=3):
    base = [
        "task=segmentation",
        f"federation.rounds={rounds}",
        "model.name=medfed:smallunet",
        "train.batch_size=8",
        "train.optimizer=adam",
        "train.lr=0.01",
        "device=cpu",
    ]
    return build_config({}, [*base, *overrides])


def test_federated_segmentation_learns_and_records_dice(tmp_path, seg_federation):
    res = run(cfg(rounds=4), out_dir=tmp_path, federation=seg_federation, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert set(rows[-1]["val"]) == {"dice", "jaccard", "pixel_acc", "mean_image_dice"}
    assert rows[-1]["val"]["dice"] > 0.6
    assert rows[-1]["val"]["dice"] > rows[0]["val"]["dice"] - 0.05
    assert rows[-1]["val_auc"] is None
    assert set(rows[-1]["site_val"]["site1"]) == {
        "dice", "jaccard", "pixel_acc", "mean_image_dice", "n"
    }  # fmt: skip
    assert rows[-1]["external"]["dice"] > 0.5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["val"] == rows[-1]["val"]
    assert res.summary["val"]["dice"] == rows[-1]["val"]["dice"]


def test_pooled_dice_equals_monai_on_all_validation_masks(seg_federation):
    torch.manual_seed(0)
    from medfed.models.factory import create_model

    model = create_model("medfed:smallunet", num_classes=2, in_chans=1)
    data = seg_federation.sites[0].train
    opts = TrainOptions(epochs=3, batch_size=8, optimizer="adam", lr=0.01)
    train_local(
        model,
        data,
        opts,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        task=Task.SEGMENTATION,
    )
    scorer = Scorer(
        Task.SEGMENTATION,
        device=torch.device("cpu"),
        batch_size=16,
        normalize="per_image",
        num_classes=2,
    )
    evaluator = Evaluator(seg_federation.sites, scorer=scorer)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    pooled, per_site = evaluator(model, STRATEGIES.create("fedavg", {}), params, {})
    preds = torch.cat(
        [predict_masks(model, s.val, device=torch.device("cpu")) for s in seg_federation.sites]
    )
    truth = torch.cat([s.val.masks for s in seg_federation.sites])
    # MONAI on one "image" holding every validation pixel = Dice of the summed counts
    monai = DiceMetric(include_background=False, reduction="none")
    onehot = lambda m: torch.nn.functional.one_hot(m.long().reshape(1, -1), 2).permute(0, 2, 1)  # noqa: E731
    expected = float(monai(onehot(preds).float(), onehot(truth).float()))
    assert pooled["dice"] == pytest.approx(expected, abs=1e-6)
    per_image = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    img = per_image(
        torch.nn.functional.one_hot(preds.long(), 2).permute(0, 3, 1, 2).float(),
        torch.nn.functional.one_hot(truth.long(), 2).permute(0, 3, 1, 2).float(),
    )
    assert pooled["mean_image_dice"] == pytest.approx(float(img.mean()), abs=1e-6)
    assert sum(v["n"] for v in per_site.values()) == len(truth)


def test_masks_flip_with_their_images():
    """A translation-invariant 3x3 filter reaches Dice 0.96 with or without flips; when half the
    lesion images are flipped without their masks it only reaches 0.85 (measured)."""
    data = make_seg_site_data(64, size=16, seed=3)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 3, padding=1)
    opts = TrainOptions(epochs=20, batch_size=16, optimizer="adam", lr=0.05, augment=True)
    train_local(
        model,
        data,
        opts,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        task=Task.SEGMENTATION,
    )
    pred = predict_masks(model, data, device=torch.device("cpu"))
    truth = data.masks.bool()
    dice = 2 * (pred.bool() & truth).sum() / (pred.bool().sum() + truth.sum())
    assert float(dice) > 0.93


def test_classification_model_is_refused_for_segmentation():
    with pytest.raises(ValueError, match="classification network but the task is segmentation"):
        cfg("model.name=medfed:smallcnn")
    with pytest.raises(ValueError, match="segmentation network but the task is classification"):
        build_config({}, ["model.name=medfed:smallunet"])


def test_data_without_masks_fails_before_training_naming_the_site(tmp_path):
    with pytest.raises(FederationError, match="site 'site0' has none in its train split"):
        run(cfg(), out_dir=tmp_path, federation=make_federation(2), progress=False)
    assert not (tmp_path / "history.jsonl").exists()


def test_fedbn_personalised_segmentation_scores_each_site_with_its_model(tmp_path, seg_federation):
    res = run(
        cfg("federation.strategy.name=fedbn", rounds=2),
        out_dir=tmp_path,
        federation=seg_federation,
        progress=False,
    )
    assert np.isfinite(res.summary["val"]["dice"])
