"""Gradient inversion building blocks: the site's update, labels, DP step, reconstruction, scoring.

The end-to-end demonstration (an attack that works without DP and fails with it) is in
test_audit.py.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from medfed.client.train import to_input
from medfed.models.factory import create_model
from medfed.privacy.attack import (
    AttackOptions,
    UpdateKind,
    as_gradient,
    attack,
    client_update,
    infer_labels,
    model_input,
    privatize,
    pyramid_sizes,
    reconstruct,
    score_space,
    trainable_names,
)
from medfed.privacy.image_metrics import score

MODELS = ["medfed:smallcnn", "medfed:smallcnn_gn", "medfed:tinycnn"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, *, classes: int = 2, size: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=classes, in_chans=1, image_size=size)


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("normalize", ["per_image", "fixed"])
def test_model_input_is_the_training_normalisation(normalize: str) -> None:
    images = _images(3)
    ref = to_input(images, torch.device("cpu"), normalize=normalize)
    torch.testing.assert_close(model_input(images.float() / 255.0, normalize), ref)


def test_client_update_is_the_train_mode_gradient_and_leaves_the_model_alone() -> None:
    model = _model("medfed:smallcnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = _images(2), torch.tensor([0, 1])
    grads = client_update(model, images, labels, normalize="per_image")
    assert list(grads) == trainable_names(model)
    # The same gradient by hand, in train mode (BatchNorm on batch statistics).
    ref = _model("medfed:smallcnn")
    ref.train()
    x = to_input(images, torch.device("cpu"), normalize="per_image")
    torch.nn.functional.cross_entropy(ref(x), labels).backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)
    for k, v in model.state_dict().items():  # running statistics included
        torch.testing.assert_close(v, before[k])


def test_delta_is_one_sgd_step_and_converts_back() -> None:
    model = _model("medfed:smallcnn_gn")
    images, labels = _images(2), torch.tensor([1, 0])
    grads = client_update(model, images, labels)
    delta = client_update(model, images, labels, kind=UpdateKind.DELTA, lr=0.05)
    # What torch's SGD does to the weights in one step (momentum or not: the first step is plain).
    stepped = _model("medfed:smallcnn_gn")
    stepped.train()
    opt = torch.optim.SGD(stepped.parameters(), lr=0.05, momentum=0.9)
    x = to_input(images, torch.device("cpu"), normalize="per_image")
    torch.nn.functional.cross_entropy(stepped(x), labels).backward()
    opt.step()
    for name, p in stepped.named_parameters():
        torch.testing.assert_close(delta[name], p.detach() - dict(model.named_parameters())[name])
    back = as_gradient(delta, kind=UpdateKind.DELTA, lr=0.05)
    for name in grads:
        torch.testing.assert_close(back[name], grads[name])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("classes", [2, 5])
def test_idlg_recovers_the_label_of_one_image(name: str, classes: int) -> None:
    for seed in range(6):
        model = _model(name, classes=classes, seed=seed)
        label = torch.tensor([seed % classes])
        grads = client_update(model, _images(1, seed=seed), label)
        assert infer_labels(model, grads, batch_size=1) == label.tolist()
        # A one-step delta carries the label the other way round; as_gradient undoes it.
        delta = client_update(model, _images(1, seed=seed), label, kind=UpdateKind.DELTA, lr=0.1)
        back = as_gradient(delta, kind=UpdateKind.DELTA, lr=0.1)
        assert infer_labels(model, back, batch_size=1) == label.tolist()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("classes", "labels"), [(2, [0, 0, 1, 1]), (2, [1] * 6 + [0, 0]),
                                                 (3, [2, 2, 2, 0]), (10, [3, 7, 1, 8])])  # fmt: skip
def test_label_counts_of_a_batch(name: str, classes: int, labels: list[int]) -> None:
    for seed in range(3):
        model = _model(name, classes=classes, seed=seed)
        grads = client_update(model, _images(len(labels), seed=seed), torch.tensor(labels))
        inferred = infer_labels(model, grads, batch_size=len(labels), image_shape=(1, 32, 32))
        assert inferred == sorted(labels)


def test_privatize_clips_then_adds_noise_of_sigma_c() -> None:
    grads = client_update(_model("medfed:smallcnn_gn"), _images(1), torch.tensor([1]))
    clipped, norm = privatize(grads, clip=0.5, noise_multiplier=0.0, generator=torch.Generator())
    assert norm > 0.5
    total = torch.sqrt(sum(v.double().pow(2).sum() for v in clipped.values()))
    assert float(total) == pytest.approx(0.5, rel=1e-5)
    noisy, _ = privatize(grads, clip=0.5, noise_multiplier=2.0, generator=torch.Generator())
    diff = torch.cat([(noisy[k] - clipped[k]).flatten() for k in grads])
    assert float(diff.std()) == pytest.approx(1.0, rel=0.05)  # sigma * C
    assert list(noisy) == list(grads)


def test_score_space_ignores_what_per_image_normalisation_hides() -> None:
    images = _images(2)
    pixels = images.float() / 255.0
    # Brightness and contrast are invisible to the network under per-image normalisation.
    recon = 0.3 * pixels + 0.2
    a, b = score_space(images, recon, "per_image")
    assert all(s.ssim == pytest.approx(1.0, abs=1e-6) for s in score(a, b))
    assert float(a.min()) == pytest.approx(0.0) and float(a.max()) == pytest.approx(1.0)
    # ...but not under fixed normalisation.
    a, b = score_space(images, recon, "fixed")
    torch.testing.assert_close(a, pixels.double())
    assert all(s.ssim < 0.9 for s in score(a, b))


def test_pyramid_sizes() -> None:
    assert pyramid_sizes((64, 64), 4) == [(8, 8), (16, 16), (32, 32), (64, 64)]
    assert pyramid_sizes((32, 32), 4) == [(8, 8), (16, 16), (32, 32)]
    assert pyramid_sizes((32, 48), 1) == [(32, 48)]


def test_options_are_validated() -> None:
    with pytest.raises(ValidationError):
        AttackOptions(batch_size=9)
    with pytest.raises(ValidationError):
        AttackOptions(device="tpu")
    with pytest.raises(ValidationError):
        AttackOptions(unknown=1)  # type: ignore[call-arg]


def test_reconstruct_reports_progress_and_stays_in_the_box() -> None:
    model = _model("medfed:smallcnn_gn", size=16)
    images, labels = _images(2, size=16), torch.tensor([0, 1])
    grads = client_update(model, images, labels)
    opts = AttackOptions(iterations=12, restarts=2, pyramid=2)
    steps: list[int] = []
    x, loss = reconstruct(
        model, grads, labels=[0, 1], shape=(2, 1, 16, 16), options=opts,
        generator=torch.Generator().manual_seed(0), on_step=steps.append,
    )  # fmt: skip
    assert x.shape == (2, 1, 16, 16)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert sum(steps) == 24 and 0.0 <= loss <= 2.5
    with pytest.raises(ValueError, match="labels for a batch"):
        reconstruct(model, grads, labels=[0], shape=(2, 1, 16, 16), options=opts,
                    generator=torch.Generator())  # fmt: skip


def test_attack_on_a_network_with_a_dense_layer_recovers_the_image() -> None:
    """TinyCNN's dense layer sees every pixel position: a quick, reliable inversion."""
    model = _model("medfed:tinycnn", size=16)
    image, label = _images(1, size=16, seed=3), torch.tensor([1])
    # A smooth image (the kind TV favours): a bright square on a dark ground.
    image = torch.zeros_like(image)
    image[..., 4:11, 5:12] = 200
    grads = client_update(model, image, label, normalize="fixed")
    opts = AttackOptions(iterations=150, restarts=1, lr=0.05, tv_weight=0.01, pyramid=1)
    result = attack(
        model, grads, shape=(1, 1, 16, 16), options=opts, lr=0.05, normalize="fixed",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert result.labels == [1]
    a, b = score_space(image, result.images, "fixed")
    assert score(a, b)[0].ssim > 0.5
