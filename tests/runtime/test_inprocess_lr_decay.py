"""``train.lr_decay``: round r trains at lr * decay**r, on every path that runs a site's round."""

from __future__ import annotations

import pytest
import torch

from medfed.algorithms import STRATEGIES
from medfed.algorithms.base import LocalTask, read_params
from medfed.client.train import TrainOptions
from medfed.data.site import ArrayDataset
from medfed.runtime.inprocess import local_round

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 4, 4), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.randint(0, 2, (8,), generator=g))


def _round(opts: TrainOptions, round_idx: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    task = LocalTask(site="s", round_idx=round_idx, global_params=read_params(model))
    algo = STRATEGIES.create("fedavg", {})
    out = local_round(algo, model, task, _data(), opts, device=torch.device("cpu"), seed=0)
    return {k: v - task.global_params[k] for k, v in out.update.params.items()}


def test_round_r_moves_the_weights_as_lr_times_decay_to_the_r() -> None:
    """One plain SGD step on the whole batch: the change is -lr * decay**r * grad, so it is
    exactly the undecayed round's change at lr * decay**r, and 0.125x it at decay 0.5, r 3."""
    base = TrainOptions(batch_size=8, lr=0.4, momentum=0.0, augment=False, max_steps=1)
    decayed = base.model_copy(update={"lr_decay": 0.5})
    moved = _round(decayed, 3)
    same = _round(base.model_copy(update={"lr": 0.4 * 0.5**3}), 3)
    full = _round(base, 3)
    for k in moved:
        torch.testing.assert_close(moved[k], same[k], rtol=0, atol=0)
        torch.testing.assert_close(moved[k], full[k] * 0.125, rtol=1e-6, atol=1e-8)
    first = _round(decayed, 0)  # round 0 trains at the configured rate
    for k in first:
        torch.testing.assert_close(first[k], _round(base, 0)[k], rtol=0, atol=0)


def test_at_round_and_its_bounds() -> None:
    opts = TrainOptions(lr=0.1, lr_decay=0.9)
    assert opts.at_round(0) is opts
    assert opts.at_round(2).lr == pytest.approx(0.1 * 0.81)
    assert TrainOptions(lr=0.1).at_round(5).lr == 0.1
    with pytest.raises(ValueError, match="lr_decay"):
        TrainOptions(lr_decay=1.5)
