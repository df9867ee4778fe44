"""Vectorised client training equals the sequential path (same batches, optimizer, loss, RNG)."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.algorithms import STRATEGIES
from medfed.algorithms.base import (
    Algorithm,
    FederationContext,
    LocalTask,
    NotVectorizable,
    read_params,
)
from medfed.client.augment import Augment
from medfed.client.train import TrainOptions, make_optimizer
from medfed.config import FaultConfig, FaultKind, VectorizeMode
from medfed.data.site import ArrayDataset
from medfed.models.factory import create_model
from medfed.privacy.config import DPConfig, DPMode
from medfed.privacy.dp import PrivateAlgorithm, Schedule
from medfed.runtime.inprocess import Failure, InProcessRuntime, VectorizeError
from medfed.runtime.vectorized import FunctionalOptimizer, _layout, draw_batches, static_reason
from medfed.types import Params, Task, Update

CPU = torch.device("cpu")
SIZES = [40, 45, 50, 37, 64]  # unequal: padded last batches, and one site with its own steps


def _data(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.randint(0, 2, (n,), generator=g))


SITES = {f"s{i}": _data(n, i) for i, n in enumerate(SIZES)}


class SmoothCNN(torch.nn.Module):
    """conv -> GroupNorm -> SiLU -> avg-pool -> linear: no kinks, so no float cliff edges.

    A ReLU/max-pool network can turn a last-bit difference into a 1e-3 weight difference
    within one round when a pre-activation sits within 1e-8 of a kink (the sequential path
    perturbed by 3e-8 does the same), so tight equality is checked on this smooth network and
    the registered ReLU networks are checked with a tolerance that allows such a kink.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.head = torch.nn.Linear(8 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.silu(self.norm(self.conv(x)))
        return self.head(torch.nn.functional.avg_pool2d(x, 4).flatten(1))


class SmoothBN(SmoothCNN):
    """:class:`SmoothCNN` with BatchNorm: running statistics per site, batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(8)  # type: ignore[assignment]


class Dropped(SmoothCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(super().forward(x), 0.0) + self.drop(x).sum() * 0

    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)


class Unused(SmoothCNN):
    """A parameter the forward never reaches (e.g. a head kept for another task)."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = torch.nn.Linear(3, 2)


def _model(name: str = "smooth") -> torch.nn.Module:
    torch.manual_seed(1)
    if name == "smooth":
        return SmoothCNN()
    if name == "unused":
        return Unused()
    if name == "smooth_bn":
        return SmoothBN()
    if name == "dropout":
        return Dropped()
    return create_model(name, num_classes=2, in_chans=1, image_size=16)


def _runtime(algo: Algorithm, model, opts: TrainOptions, mode: VectorizeMode, **kw):
    return InProcessRuntime(
        model=model, algorithm=algo, data=SITES, opts=opts, device=CPU, seed=3, vectorize=mode, **kw
    )


def _rounds(
    algo_factory, opts: TrainOptions, mode: VectorizeMode, *, rounds: int = 2, **kw
) -> tuple[Params, list, InProcessRuntime]:
    """``rounds`` rounds of the algorithm's whole loop through the in-process runtime."""
    model = _model(kw.pop("model_name", "smooth"))
    algo: Algorithm = algo_factory()
    params = read_params(model)
    state = algo.init(params, context=FederationContext(model=model, sites=tuple(SITES)))
    runtime = _runtime(algo, model, opts, mode, **kw)
    outcomes: list = []
    for r in range(rounds):
        outcomes = runtime.execute(r, list(SITES), params, algo.payload(state))
        updates = [o for o in outcomes if isinstance(o, Update)]
        params, state = algo.aggregate(params, updates, state, round_idx=r)
    return params, outcomes, runtime


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _assert_same(
    opts: TrainOptions, algo_factory, *, atol: float = 1e-5, rounds: int = 2, **kw
) -> None:
    """Both runtimes side by side; each round both start from the sequential global model.

    Per round, because training amplifies last-bit differences: a pre-activation that sits
    within 1e-8 of a ReLU/max-pool kink can move a weight by 1e-3 within a round, and does so
    for a 3e-8 perturbation of the *sequential* path too. The workloads here (lr 0.01, a few
    steps) stay clear of that, so a real mismatch (a batch, a step, a hyperparameter) shows.
    """
    model = _model(kw.pop("model_name", "smooth"))
    algo: Algorithm = algo_factory()
    params = read_params(model)
    state = algo.init(params, context=FederationContext(model=model, sites=tuple(SITES)))
    seq_rt = _runtime(algo, model, opts, VectorizeMode.OFF, **kw)
    vec_rt = _runtime(algo, model, opts, VectorizeMode.ON, **kw)
    trained = _count_vectorised(vec_rt)
    for r in range(rounds):
        payload = algo.payload(state)
        seq_out = seq_rt.execute(r, list(SITES), params, payload)
        vec_out = vec_rt.execute(r, list(SITES), params, payload)
        for a, b in zip(seq_out, vec_out, strict=True):
            assert (a.site, a.num_examples) == (b.site, b.num_examples)
            assert a.metrics.keys() == b.metrics.keys()
            for key, value in a.metrics.items():
                assert b.metrics[key] == pytest.approx(value, abs=atol), key
            for k, v in a.params.items():
                _close(b.params[k], v, atol)
            for group, tensors in a.extras.items():
                for k, v in tensors.items():
                    _close(b.extras[group][k], v, atol)
        assert seq_rt.client_states.keys() == vec_rt.client_states.keys()
        for site, groups in seq_rt.client_states.items():
            for group, tensors in groups.items():
                for k, v in tensors.items():
                    _close(vec_rt.client_states[site][group][k], v, atol)
        updates = [o for o in seq_out if isinstance(o, Update)]
        params, state = algo.aggregate(params, updates, state, round_idx=r)
    assert sum(trained) == rounds * len(SITES)  # every site of every round went through vmap


@pytest.mark.parametrize(
    "opts",
    [
        TrainOptions(batch_size=8),  # momentum 0.9, flips, per-image z-score
        TrainOptions(batch_size=16, epochs=1.5, weight_decay=1e-3, normalize="fixed"),
        TrainOptions(batch_size=8, max_steps=3, augment=False),
        TrainOptions(batch_size=8, lr=0.01, optimizer="adamw", weight_decay=0.01),
    ],
)
def test_fedavg_equals_sequential(opts: TrainOptions) -> None:
    _assert_same(opts, lambda: STRATEGIES.create("fedavg", {}))


@pytest.mark.parametrize("model_name", ["medfed:tinycnn", "medfed:smallcnn_gn"])
def test_registered_small_cnns_equal_sequential_up_to_a_kink(model_name: str) -> None:
    opts = TrainOptions(batch_size=8, max_steps=4)
    fedavg = lambda: STRATEGIES.create("fedavg", {})  # noqa: E731
    _assert_same(opts, fedavg, atol=2e-3, model_name=model_name)


def _count_vectorised(runtime: InProcessRuntime) -> list[int]:
    """Spy: the size of every group the vectorised path trains."""
    assert runtime._vector is not None
    sizes: list[int] = []
    train = runtime._vector.train

    def spy(group):  # type: ignore[no-untyped-def]
        sizes.append(len(group))
        return train(group)

    runtime._vector.train = spy  # type: ignore[method-assign]
    return sizes


@pytest.mark.parametrize(("model_name", "atol"), [("smooth_bn", 1e-5), ("medfed:smallcnn", 2e-3)])
def test_batchnorm_models_equal_sequential_with_per_site_running_statistics(
    model_name: str, atol: float
) -> None:
    """Every site's BatchNorm running mean/var/count come back as its own sequential training
    leaves them (the uploads carry them), and its weights as trained on its batch statistics."""
    opts = TrainOptions(batch_size=8, max_steps=4)  # every site: 4 full batches, one group
    fedavg = lambda: STRATEGIES.create("fedavg", {})  # noqa: E731
    assert any(k.endswith("running_var") for k in _model(model_name).state_dict())
    _assert_same(opts, fedavg, atol=atol, model_name=model_name)


def test_batchnorm_sites_with_different_batch_sizes_are_never_padded() -> None:
    """Batch statistics would see padding: BN sites group by their exact batch sizes."""
    opts = TrainOptions(batch_size=8)
    data = {"a": _data(40, 0), "b": _data(40, 1), "c": _data(45, 2), "d": _data(47, 3)}
    model = _model("smooth_bn")
    algo = STRATEGIES.create("fedavg", {})
    runtime = InProcessRuntime(
        model=model,
        algorithm=algo,
        data=data,
        opts=opts,
        device=CPU,
        seed=3,
        vectorize=VectorizeMode.ON,
    )
    assert runtime._vector is not None
    tasks = [
        LocalTask(site=s, round_idx=0, global_params=read_params(model), payload={}) for s in data
    ]
    split = runtime._vector.split(tasks, list(data.values()))
    groups = sorted(sorted(j.task.site for j in g) for g in split.groups)
    # a, b: 5 batches of 8; c: 5 x 8 + 5; d: 5 x 8 + 7 -- same step count, other last batch
    assert groups == [["a", "b"], ["c"], ["d"]]
    for group in split.groups:
        assert len({tuple(len(i) for i, _ in job.batches) for job in group}) == 1


def test_adam_equals_sequential_within_its_amplification() -> None:
    # Adam divides by sqrt(v): last-bit gradient differences of the batched convolution grow.
    _assert_same(
        TrainOptions(batch_size=8, lr=0.01, optimizer="adam"),
        lambda: STRATEGIES.create("fedavg", {}),
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "opts",
    [
        TrainOptions(batch_size=8, weight_decay=1e-2),  # momentum 0.9
        TrainOptions(batch_size=8, lr=0.01, optimizer="adamw", weight_decay=0.1),
    ],
)
def test_a_parameter_without_gradient_stays_put_as_torch_optim_leaves_it(
    opts: TrainOptions,
) -> None:
    """torch.optim skips a parameter whose .grad is None (no decay, no momentum); torch.func
    gives it zeros, which weight decay would shrink. Both paths must leave it where it was."""
    _assert_same(opts, lambda: STRATEGIES.create("fedavg", {}), model_name="unused")
    start = read_params(_model("unused"))
    params, _, runtime = _rounds(
        lambda: STRATEGIES.create("fedavg", {}), opts, VectorizeMode.ON, model_name="unused"
    )
    assert runtime._vector is not None and runtime._vector.trainer.unused == {
        "spare.weight",
        "spare.bias",
    }
    assert torch.equal(params["spare.weight"], start["spare.weight"])
    assert not torch.equal(params["head.weight"], start["head.weight"])  # the rest trained


def test_fedprox_equals_sequential() -> None:
    opts = TrainOptions(batch_size=8, weight_decay=1e-3)
    _assert_same(opts, lambda: STRATEGIES.create("fedprox", {"mu": 0.5}))


@pytest.mark.parametrize("lr_decay", [1.0, 0.5])
def test_scaffold_equals_sequential_with_control_variates(lr_decay: float) -> None:
    # Two rounds: the second uses a non-zero c and each site's stored c_i, and (decayed) a
    # halved learning rate, which SCAFFOLD's control-variate update divides by.
    opts = TrainOptions(batch_size=8, lr_decay=lr_decay)
    _assert_same(opts, lambda: STRATEGIES.create("scaffold", {}))


@pytest.mark.parametrize("mode", [DPMode.LOCAL, DPMode.CENTRAL])
def test_dp_clip_and_noise_equal_sequential(mode: DPMode) -> None:
    cfg = DPConfig(mode=mode, clip=0.05, noise_multiplier=1.0)

    def private() -> PrivateAlgorithm:
        schedule = Schedule(rounds=2, fraction=1.0, num_sites=len(SITES))
        return PrivateAlgorithm(STRATEGIES.create("fedavg", {}), cfg, schedule=schedule, seed=0)

    _assert_same(TrainOptions(batch_size=8), private)


def test_fedavg_on_a_single_step_matches_a_hand_computed_sgd_step() -> None:
    # One site, one batch of all its images, plain SGD: w' = w - lr * dL/dw from autograd.
    opts = TrainOptions(batch_size=64, momentum=0.0, augment=False, normalize="fixed", lr=0.1)
    data = _data(10, 7)
    model = _model()
    params = read_params(model)
    algo = STRATEGIES.create("fedavg", {})
    runtime = InProcessRuntime(
        model=model, algorithm=algo, data={"a": data}, opts=opts, device=CPU, seed=0,
        vectorize=VectorizeMode.ON,
    )  # fmt: skip
    (update,) = runtime.execute(0, ["a"], params, {})
    ref = _model()
    x = (data.images.float() / 255 - 0.5) / 0.25
    order = draw_batches(10, opts, torch.Generator().manual_seed(0))  # order is irrelevant here
    assert len(order) == 1
    loss = torch.nn.functional.cross_entropy(ref(x), data.labels)
    loss.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(
            update.params[name], p.detach() - 0.1 * p.grad, atol=1e-6, rtol=0
        )
    assert update.metrics["train_loss"] == pytest.approx(loss.item(), abs=1e-6)


def test_functional_optimizer_matches_torch_step_by_step() -> None:
    for opts in (
        TrainOptions(optimizer="sgd", momentum=0.9, weight_decay=0.01),
        TrainOptions(optimizer="adam", weight_decay=0.01),
        TrainOptions(optimizer="adamw", weight_decay=0.01),
    ):
        model = _model()
        reference = make_optimizer(model, opts)
        functional = FunctionalOptimizer.create(model, opts)
        stacked = {k: v.detach().clone().unsqueeze(0) for k, v in model.named_parameters()}
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            grads = {k: torch.randn(v.shape, generator=g) for k, v in model.named_parameters()}
            for k, p in model.named_parameters():
                p.grad = grads[k].clone()
            reference.step()
            functional.step(stacked, {k: v.unsqueeze(0) for k, v in grads.items()})
        for k, p in model.named_parameters():
            torch.testing.assert_close(stacked[k][0], p.detach(), atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 40), min_size=1, max_size=4),
    batch=st.integers(2, 9),
    augment=st.booleans(),
)
def test_layout_reproduces_every_sites_batches(sizes: list[int], batch: int, augment: bool) -> None:
    """Padding aside, the gathered (S, K, B) layout is each site's own batch sequence."""
    from medfed.runtime.vectorized import SiteJob

    opts = TrainOptions(batch_size=batch, augment=augment, max_steps=3)
    jobs = []
    for i, n in enumerate(sizes):
        gen = torch.Generator().manual_seed(i)
        batches = draw_batches(n, opts, gen)
        if len(batches) != 3 and any(len(j.batches) == 3 for j in jobs):
            continue
        jobs.append(SiteJob(None, None, _data(n, i), gen, batches))  # type: ignore[arg-type]
    steps = {len(j.batches) for j in jobs}
    if len(steps) != 1 or 0 in steps:
        return
    offsets = [sum(len(j.data) for j in jobs[:i]) for i in range(len(jobs))]
    layout = _layout(jobs, offsets, augment)
    for k, (job, off) in enumerate(zip(jobs, offsets, strict=True)):
        for s, (idx, flip) in enumerate(job.batches):
            m = len(idx)
            assert torch.equal(layout.index[s, k, :m], idx + off)
            assert layout.weight[s, k, :m].eq(1).all() and layout.weight[s, k, m:].eq(0).all()
            if augment:
                assert layout.flips is not None and torch.equal(layout.flips[s, k, :m], flip)


def test_unsupported_setups_name_their_reason() -> None:
    opts = TrainOptions()
    fedavg = STRATEGIES.create("fedavg", {})
    dropped = _model("dropout")
    assert "dropout" in (
        static_reason(dropped, fedavg, opts, task=Task.CLASSIFICATION, device=CPU) or ""
    )
    bn = _model("medfed:smallcnn")  # per-site BatchNorm is vectorised
    assert static_reason(bn, fedavg, opts, task=Task.CLASSIFICATION, device=CPU) is None
    tiny = _model()
    seg = static_reason(tiny, fedavg, opts, task=Task.SEGMENTATION, device=CPU)
    assert seg is not None and "segmentation" in seg
    fedbn = STRATEGIES.create("fedbn", {})
    assert "fedbn" in (static_reason(tiny, fedbn, opts, task=Task.CLASSIFICATION, device=CPU) or "")
    scaffold = STRATEGIES.create("scaffold", {})
    with pytest.raises(NotVectorizable, match="SGD"):
        scaffold.vector_step(TrainOptions(optimizer="adam"))
    dpsgd = PrivateAlgorithm(
        fedavg,
        DPConfig(mode=DPMode.DPSGD, noise_multiplier=1.0),
        schedule=Schedule(rounds=1, fraction=1.0, num_sites=1),
        seed=0,
    )
    assert "dpsgd" in (static_reason(tiny, dpsgd, opts, task=Task.CLASSIFICATION, device=CPU) or "")
    assert static_reason(tiny, fedavg, opts, task=Task.CLASSIFICATION, device=CPU) is None
    shifted = opts.model_copy(update={"augment": Augment.ACQUISITION})
    reason = static_reason(tiny, fedavg, shifted, task=Task.CLASSIFICATION, device=CPU)
    assert reason is not None and "acquisition" in reason


def test_on_with_unsupported_model_is_a_clear_error() -> None:
    with pytest.raises(VectorizeError, match="vectorize is on.*dropout"):
        InProcessRuntime(
            model=_model("dropout"),
            algorithm=STRATEGIES.create("fedavg", {}),
            data=SITES,
            opts=TrainOptions(),
            device=CPU,
            seed=0,
            vectorize=VectorizeMode.ON,
        )


def test_auto_falls_back_with_one_warning_per_run(caplog: pytest.LogCaptureFixture) -> None:
    opts = TrainOptions(batch_size=16, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="medfed.runtime.inprocess"):
        _, outcomes, runtime = _rounds(
            lambda: STRATEGIES.create("fedbn", {}),
            opts,
            VectorizeMode.AUTO,
            rounds=3,
            vector_min_clients=2,
            model_name="medfed:smallcnn",
        )
    assert runtime._vector is None and all(isinstance(o, Update) for o in outcomes)
    warnings = [r for r in caplog.records if "sequential client training" in r.message]
    assert len(warnings) == 1 and "fedbn" in warnings[0].message


def test_auto_below_min_clients_stays_sequential_and_bit_identical() -> None:
    opts = TrainOptions(batch_size=8)
    fedavg = lambda: STRATEGIES.create("fedavg", {})  # noqa: E731
    seq, _, _ = _rounds(fedavg, opts, VectorizeMode.OFF)
    auto, _, _ = _rounds(fedavg, opts, VectorizeMode.AUTO)  # 5 sites < 8
    assert all(torch.equal(seq[k], auto[k]) for k in seq)


def test_faulty_and_refused_sites_keep_their_sequential_outcomes() -> None:
    opts = TrainOptions(batch_size=8, max_steps=2)
    faults = [
        FaultConfig(site="s1", kind=FaultKind.RAISE, rounds=[0]),
        FaultConfig(site="s2", kind=FaultKind.NAN, rounds=[0]),
        FaultConfig(site="s3", kind=FaultKind.DROP, rounds=[0]),
    ]
    fedavg = lambda: STRATEGIES.create("fedavg", {})  # noqa: E731
    _, seq, _ = _rounds(fedavg, opts, VectorizeMode.OFF, rounds=1, faults=faults)
    _, vec, _ = _rounds(fedavg, opts, VectorizeMode.ON, rounds=1, faults=faults)
    assert [type(o) for o in seq] == [type(o) for o in vec]
    assert [o.reason for o in vec if isinstance(o, Failure)] == [
        o.reason for o in seq if isinstance(o, Failure)
    ]
    assert torch.isnan(vec[2].params["conv.weight"]).any()


def test_config_reads_yaml_on_off_and_auto_stays_sequential_on_cpu() -> None:
    from medfed.config import build_config
    from medfed.runtime.vectorized import run_mode

    assert build_config({}, ["runtime.vectorize=off"]).runtime.vectorize is VectorizeMode.OFF
    assert build_config({}, ["runtime.vectorize=on"]).runtime.vectorize is VectorizeMode.ON
    auto = build_config({}).runtime.vectorize
    assert auto is VectorizeMode.AUTO
    assert run_mode(auto, CPU) is VectorizeMode.OFF
    assert run_mode(auto, torch.device("cuda")) is VectorizeMode.AUTO
    assert run_mode(VectorizeMode.ON, CPU) is VectorizeMode.ON


def test_engine_run_vectorised_matches_sequential_with_pooled_metrics_only(tmp_path) -> None:
    from medfed.config import build_config
    from medfed.data.site import Federation, Site
    from medfed.engine import run

    fed = Federation(tuple(Site.from_dataset(f"s{i}", _data(40, i), seed=i) for i in range(3)))
    raw = {
        "device": "cpu",
        "model": {"name": "medfed:smallcnn_gn"},
        "train": {"batch_size": 8, "max_steps": 2, "lr": 0.01},
        "federation": {"rounds": 2, "min_clients": 1},
    }
    results = {}
    for mode in ("off", "on"):
        cfg = build_config(raw, [f"runtime.vectorize={mode}", "runtime.site_metrics=false"])
        results[mode] = run(cfg, out_dir=tmp_path / mode, federation=fed, progress=False)
    seq, vec = results["off"], results["on"]
    for k, v in seq.final_params.items():
        _close(vec.final_params[k], v, 2e-3)  # two rounds: a kink may have moved a weight
    for a, b in zip(seq.history, vec.history, strict=True):
        assert a["site_val"] == b["site_val"] == {}  # pooled validation only
        assert b["val"]["auc"] == pytest.approx(a["val"]["auc"], abs=0.05)
        assert {s: r["examples"] for s, r in a["sites"].items()} == {
            s: r["examples"] for s, r in b["sites"].items()
        }


def test_bf16_autocast_runs_the_vectorised_forward_in_bf16_like_the_sequential_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``train.amp`` (bf16 autocast, CUDA only) is no longer a reason to train sequentially. On
    this CPU both paths are given CPU bf16 autocast instead: the vmapped forward must run its
    convolutions in bf16 (a hook sees the dtype; the weights alone cannot tell, as bf16 moves
    these 4 small steps by ~3e-5, about what batched bf16 kernels differ by) and land within
    bf16 rounding of the sequential bf16 round."""
    import contextlib

    import medfed.client.train as train_mod
    import medfed.runtime.vectorized as vec_mod

    def cpu_bf16(device: torch.device, enabled: bool):  # type: ignore[no-untyped-def]
        if enabled:
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    monkeypatch.setattr(train_mod, "autocast", cpu_bf16)
    monkeypatch.setattr(vec_mod, "autocast", cpu_bf16)
    opts = TrainOptions(batch_size=8, max_steps=4, lr=0.01, amp=True)
    fedavg = STRATEGIES.create("fedavg", {})
    assert static_reason(_model(), fedavg, opts, task=Task.CLASSIFICATION, device=CPU) is None
    dtypes: set[torch.dtype] = set()
    results = {}
    for mode in (VectorizeMode.OFF, VectorizeMode.ON):
        model = _model()
        hook = model.conv.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        params = read_params(model)
        runtime = _runtime(fedavg, model, opts, mode)
        if mode is VectorizeMode.ON:
            trained = _count_vectorised(runtime)
        dtypes.clear()
        results[mode] = runtime.execute(0, list(SITES), params, {})
        assert dtypes == {torch.bfloat16}, (mode, dtypes)
        hook.remove()
    assert sum(trained) == len(SITES)
    fp32 = _runtime(fedavg, _model(), opts.model_copy(update={"amp": False}), VectorizeMode.OFF)
    exact = fp32.execute(0, list(SITES), read_params(_model()), {})
    for seq, vec, ref in zip(
        results[VectorizeMode.OFF], results[VectorizeMode.ON], exact, strict=True
    ):
        for k, v in seq.params.items():
            if not v.is_floating_point():
                continue
            _close(vec.params[k], v, atol=2e-4)  # measured <= 5e-5: two bf16 roundings
        assert (
            max(
                (seq.params[k] - ref.params[k]).abs().max().item()
                for k in seq.params
                if seq.params[k].is_floating_point()
            )
            > 1e-5
        )  # bf16 really changed the arithmetic
