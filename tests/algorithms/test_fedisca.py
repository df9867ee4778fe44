"""FedISCA: DeepInversion synthesis, noise-adapted teachers, distillation (tiny, on CPU)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from medfed.algorithms.fedisca import (
    BNStatHook,
    FedISCAOptions,
    Snapshot,
    Synthesis,
    adapt_teachers,
    bn_statistic_distance,
    distill,
    kd_loss,
    one_shot,
    synthesize,
    teacher_average,
    to_display,
)
from medfed.client.train import TrainOptions, to_input, train_local
from medfed.models.factory import SmallCNN, create_model
from tests.conftest import make_site_data

CPU = torch.device("cpu")
SHAPE = (1, 16, 16)

# Tiny but faithful: the reference's loss weights, fewer iterations and images.
TINY = FedISCAOptions(
    synthesis_iterations=40,
    batch_size=16,
    snapshot_every=4,
    rounds=1,
    distill_optimizer="adam",
    distill_lr=3e-3,
    distill_weight_decay=0.0,
    temperature=4.0,
)


def trained_teacher(seed: int, n: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("medfed:smallcnn", num_classes=2, in_chans=1, image_size=16)
    opts = TrainOptions(epochs=8, batch_size=16, lr=0.05, augment=False)
    train_local(
        model,
        make_site_data(n, seed=seed),
        opts,
        generator=torch.Generator().manual_seed(seed),
        device=CPU,
    )
    return model.eval()


@pytest.fixture(scope="module")
def teacher() -> Iterator[nn.Module]:
    # One thread, as the per-test fixture sets: on a loaded 2-core machine the default pool
    # made this 0.5 s training take 20 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = trained_teacher(0)
    finally:
        torch.set_num_threads(before)
    model.zero_grad(set_to_none=True)
    yield model


def run_synthesis(teachers: list[nn.Module], options: FedISCAOptions, seed: int = 0) -> Synthesis:
    return synthesize(
        teachers,
        num_classes=2,
        image_shape=SHAPE,
        options=options,
        generator=torch.Generator().manual_seed(seed),
        device=CPU,
    )


def quarters(values: list[float]) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- synthesis ---------------------------------------------------------------------------------


def test_bn_matching_loss_decreases_during_synthesis(teacher: nn.Module) -> None:
    before = state_copy(teacher)
    syn = run_synthesis([teacher], TINY.model_copy(update={"synthesis_iterations": 60}))
    first, last = quarters(syn.losses["bn"])
    assert last < 0.7 * first
    first_total, last_total = quarters(syn.losses["total"])
    assert last_total < first_total
    # The teacher is only read: no weight, statistic or mode changed, no gradient left behind.
    assert_same_state(before, teacher.state_dict())
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())


def test_cross_entropy_to_targets_decreases(teacher: nn.Module) -> None:
    # At 16 px with a 4-layer CNN, the default BN weight (10) dominates the objective; a lighter
    # one lets the class signal show within a few dozen steps.
    opts = TINY.model_copy(update={"bn_weight": 1.0, "synthesis_iterations": 60})
    syn = run_synthesis([teacher], opts)
    first, last = quarters(syn.losses["ce"])
    assert last < 0.5 * first
    assert syn.teacher_accuracy >= 0.75


def test_snapshots_run_from_noise_with_balanced_labels(teacher: nn.Module) -> None:
    opts = TINY.model_copy(update={"synthesis_iterations": 10, "snapshot_every": 3})
    syn = run_synthesis([teacher], opts, seed=5)
    assert [s.iteration for s in syn.snapshots] == [0, 3, 6, 9, 10]
    noise = torch.randn((opts.batch_size, *SHAPE), generator=torch.Generator().manual_seed(5))
    assert torch.equal(syn.snapshots[0].images, noise)
    assert not torch.equal(syn.snapshots[-1].images, noise)
    for snap in syn.snapshots:
        assert snap.images.shape == (opts.batch_size, *SHAPE)
        assert snap.images.dtype == torch.float32 and snap.images.device == CPU
        assert torch.bincount(snap.labels, minlength=2).tolist() == [8, 8]
    assert {k: len(v) for k, v in syn.losses.items()} == dict.fromkeys(syn.losses, 10)
    assert set(syn.losses) >= {"total", "ce", "bn", "tv", "l2"}


def test_same_seed_same_synthesis(teacher: nn.Module) -> None:
    opts = TINY.model_copy(update={"synthesis_iterations": 8, "flip": True})
    a, b = run_synthesis([teacher], opts, seed=3), run_synthesis([teacher], opts, seed=3)
    c = run_synthesis([teacher], opts, seed=4)
    assert a.losses == b.losses
    for sa, sb in zip(a.snapshots, b.snapshots, strict=True):
        assert sa.iteration == sb.iteration
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
    assert not torch.equal(a.snapshots[-1].images, c.snapshots[-1].images)


def test_progress_sees_every_iteration(teacher: nn.Module) -> None:
    seen: list[int] = []
    synthesize(
        [teacher],
        num_classes=2,
        image_shape=SHAPE,
        options=TINY.model_copy(update={"synthesis_iterations": 5}),
        generator=torch.Generator().manual_seed(0),
        device=CPU,
        progress=lambda it, losses: seen.append(it) if "bn" in losses else None,
    )
    assert seen == [1, 2, 3, 4, 5]


# -- BatchNorm matching ------------------------------------------------------------------------


def test_bn_distance_is_deepinversions_norm_of_mean_and_var_gaps() -> None:
    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    expected = torch.linalg.vector_norm(1 - var) + torch.linalg.vector_norm(0 - mean)
    assert torch.allclose(bn_statistic_distance(x, bn), expected)
    bn.load_state_dict({**bn.state_dict(), "running_mean": mean, "running_var": var})
    assert bn_statistic_distance(x, bn).item() == pytest.approx(0.0, abs=1e-5)


def test_bn_hook_scales_first_layer_and_is_removed() -> None:
    torch.manual_seed(0)
    net = SmallCNN(in_chans=1, num_classes=2, width=4).eval()
    x = torch.randn(6, *SHAPE)
    plain, scaled = BNStatHook([net]), BNStatHook([net], first_multiplier=10.0)
    net(x)
    assert plain.num_layers == 4
    per_layer = list(plain._values.values())
    assert plain.loss().item() == pytest.approx(sum(v.item() for v in per_layer), rel=1e-5)
    expected = 10 * per_layer[0].item() + sum(v.item() for v in per_layer[1:])
    assert scaled.loss().item() == pytest.approx(expected, rel=1e-5)
    plain.close()
    scaled.close()
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(RuntimeError, match="forward pass"):
        BNStatHook([net]).loss()


# -- heterogeneous teachers --------------------------------------------------------------------


def test_heterogeneous_teachers(teacher: nn.Module) -> None:
    torch.manual_seed(1)
    narrow = SmallCNN(in_chans=1, num_classes=2, width=8).eval()
    group = create_model("medfed:smallcnn_gn", num_classes=2, in_chans=1, image_size=16).eval()
    teachers = [teacher, narrow, group]
    hook = BNStatHook(teachers)
    assert hook.num_layers == 8  # the GroupNorm teacher contributes no BN term
    hook.close()
    opts = TINY.model_copy(update={"synthesis_iterations": 8, "snapshot_every": 2})
    student = create_model("medfed:tinycnn", num_classes=2, in_chans=1, image_size=16)
    result = one_shot(
        teachers,
        student,
        num_classes=2,
        image_shape=SHAPE,
        options=opts,
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    assert result.epochs == 1 and result.best_epoch == 1
    assert result.state_dict.keys() == student.state_dict().keys()


def test_teachers_without_batchnorm_are_refused() -> None:
    teachers = [
        create_model("medfed:smallcnn_gn", num_classes=2, in_chans=1, image_size=16),
        create_model("medfed:tinycnn", num_classes=2, in_chans=1, image_size=16),
    ]
    with pytest.raises(ValueError, match="BatchNorm"):
        run_synthesis(teachers, TINY)


# -- client model adaptation -------------------------------------------------------------------


def test_adapt_teachers_changes_bn_statistics_only_on_copies(teacher: nn.Module) -> None:
    syn = run_synthesis([teacher], TINY.model_copy(update={"synthesis_iterations": 8}))
    group = create_model("medfed:smallcnn_gn", num_classes=2, in_chans=1, image_size=16)
    originals = [state_copy(teacher), state_copy(group)]
    adapted, adapted_group = adapt_teachers([teacher, group], syn.snapshots, device=CPU)
    assert adapted is not teacher and not adapted.training
    assert_same_state(originals[0], teacher.state_dict())
    assert_same_state(originals[1], group.state_dict())
    assert_same_state(originals[1], adapted_group.state_dict())
    new = adapted.state_dict()
    stats = [k for k in new if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(new[k], originals[0][k]) for k in stats)
    weights = dict(teacher.named_parameters())
    assert all(torch.equal(p, weights[k]) for k, p in adapted.named_parameters())


def first_bn_mean(model: nn.Module) -> float:
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_mean is not None
    return float(bn.running_mean.item())


def test_adapt_without_momentum_averages_over_snapshots() -> None:
    bn = nn.BatchNorm2d(1)
    bn.load_state_dict({**bn.state_dict(), "running_mean": torch.full((1,), 5.0)})
    net = nn.Sequential(bn, nn.Flatten(), nn.Linear(16 * 16, 2))
    g = torch.Generator().manual_seed(0)
    snaps = [
        Snapshot(i, torch.randn(8, *SHAPE, generator=g) + i, torch.arange(8) % 2) for i in range(3)
    ]
    (adapted,) = adapt_teachers([net], snaps, device=CPU, momentum=None)
    expected = torch.stack([s.images.mean() for s in snaps]).mean()
    assert first_bn_mean(adapted) == pytest.approx(expected.item(), rel=1e-5)
    (ema,) = adapt_teachers([net], snaps, device=CPU, momentum=1.0)
    # Realistic -> noise: with momentum 1 only the first snapshot (the noise) remains.
    assert first_bn_mean(ema) == pytest.approx(snaps[0].images.mean().item(), rel=1e-5)


# -- distillation ------------------------------------------------------------------------------


def test_kd_loss_is_temperature_scaled_kl() -> None:
    s, t = torch.tensor([[1.0, -1.0], [0.5, 0.2]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert kd_loss(t, t, 20.0).item() == pytest.approx(0.0, abs=1e-4)
    p, log_q = torch.softmax(t / 4, 1), torch.log_softmax(s / 4, 1)
    expected = (p * (p.log() - log_q)).sum(1).mean() * 16
    assert kd_loss(s, t, 4.0).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_distillation_from_one_teacher_recovers_its_predictions(seed: int) -> None:
    # Verified offline over 8 seeds: agreement 0.95-1.00 on held-out real images.
    teacher = trained_teacher(seed)
    held = make_site_data(200, seed=seed + 50)
    x = to_input(held.images, CPU, normalize="per_image")
    with torch.no_grad():
        wanted = teacher(x).argmax(1)
    assert (wanted == held.labels).float().mean() > 0.9  # a teacher worth copying
    torch.manual_seed(seed + 1)
    student = create_model("medfed:smallcnn", num_classes=2, in_chans=1, image_size=16)
    opts = TINY.model_copy(
        update={
            "synthesis_iterations": 100,
            "batch_size": 64,
            "bn_weight": 1.0,
            "rounds": 2,
            "distill_epochs": 5,
        }
    )
    before = state_copy(teacher)
    result = one_shot(
        [teacher],
        student,
        num_classes=2,
        image_shape=SHAPE,
        options=opts,
        generator=torch.Generator().manual_seed(seed),
        device=CPU,
    )
    assert result.epochs == 10 and result.validation == ()
    assert_same_state(before, teacher.state_dict())
    student.eval()
    with torch.no_grad():
        agreement = (student(x).argmax(1) == wanted).float().mean().item()
    assert agreement >= 0.9


def test_distill_leaves_teachers_and_adapted_copies_untouched(teacher: nn.Module) -> None:
    syn = run_synthesis([teacher], TINY.model_copy(update={"synthesis_iterations": 8}))
    (adapted,) = adapt_teachers([teacher], syn.snapshots, device=CPU)
    before, before_adapted = state_copy(teacher), state_copy(adapted)
    student = create_model("medfed:tinycnn", num_classes=2, in_chans=1, image_size=16)
    initial = state_copy(student)
    result = distill(student, [teacher], [adapted], syn, options=TINY, device=CPU)
    assert_same_state(before, teacher.state_dict())
    assert_same_state(before_adapted, adapted.state_dict())
    assert not teacher.training and not adapted.training
    assert any(not torch.equal(initial[k], v) for k, v in result.state_dict.items())
    assert_same_state(result.state_dict, student.state_dict())
    # Without adapted teachers (the ablation), the originals teach on every snapshot.
    ablation = distill(student, [teacher], [], syn, options=TINY, device=CPU)
    assert ablation.epochs == 1


def test_model_selection_follows_the_validation_callable(teacher: nn.Module) -> None:
    syn = run_synthesis([teacher], TINY.model_copy(update={"synthesis_iterations": 8}))
    (adapted,) = adapt_teachers([teacher], syn.snapshots, device=CPU)
    scores = iter([0.2, 0.9, 0.5, 0.9])
    states: list[dict[str, torch.Tensor]] = []

    def validate(model: nn.Module) -> float:
        states.append(state_copy(model))
        return next(scores)

    student = create_model("medfed:tinycnn", num_classes=2, in_chans=1, image_size=16)
    opts = TINY.model_copy(update={"distill_epochs": 4})
    result = distill(
        student, [teacher], [adapted], syn, options=opts, device=CPU, validate=validate
    )
    assert result.validation == (0.2, 0.9, 0.5, 0.9)
    assert result.best_epoch == 2  # the first of the tied best
    assert_same_state(states[1], result.state_dict)
    assert_same_state(states[1], student.state_dict())
    assert not torch.equal(states[1]["fc.weight"], states[3]["fc.weight"])

    plain = distill(student, [teacher], [adapted], syn, options=opts, device=CPU)
    assert plain.best_epoch == 4 and plain.validation == ()


# -- options and display -----------------------------------------------------------------------


def test_presets_are_the_published_defaults() -> None:
    small, large = FedISCAOptions.preset("small"), FedISCAOptions.preset("large")
    assert (small.synthesis_iterations, small.batch_size) == (500, 256)
    assert (large.synthesis_iterations, large.batch_size) == (1000, 50)
    for opts in (small, large):
        assert opts.synthesis_lr == 0.05 and opts.bn_weight == 10.0
        assert opts.tv_weight == 2.5e-5 and opts.temperature == 20.0
    assert small.jitter_for(28) == 2 and large.jitter_for(224) == 30
    assert FedISCAOptions.preset("large", jitter=0).jitter_for(224) == 0
    with pytest.raises(ValidationError):
        FedISCAOptions(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        small.temperature = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="fractions"):
        FedISCAOptions(lr_milestones=(0.5, 1.5))
    with pytest.raises(ValueError, match="preset"):
        FedISCAOptions.preset("huge")  # type: ignore[arg-type]


def test_to_display_scales_each_image_to_uint8() -> None:
    images = torch.stack([torch.linspace(-3, 5, 16).view(1, 4, 4), torch.zeros(1, 4, 4)])
    out = to_display(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert out[0].min().item() == 0 and out[0].max().item() == 255
    assert out[1].eq(0).all()


def test_teacher_average_weights_by_examples_and_refuses_mixed_architectures() -> None:
    a = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    b = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        a[0].weight.fill_(1.0)
        b[0].weight.fill_(4.0)
        a[1].running_mean.fill_(2.0)
        b[1].running_mean.fill_(-2.0)
    avg = teacher_average([a, b], [1.0, 3.0])
    # (1*1 + 3*4) / 4 = 3.25 and (1*2 - 3*2) / 4 = -1, by hand
    torch.testing.assert_close(avg["0.weight"], torch.full((1, 2), 3.25))
    torch.testing.assert_close(avg["1.running_mean"], torch.tensor([-1.0]))
    assert avg["0.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="one architecture"):
        teacher_average([a, nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))], [1.0, 1.0])
