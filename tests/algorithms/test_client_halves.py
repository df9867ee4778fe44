"""Client halves on a real tiny CNN (with BatchNorm2d) and a tiny uint8 image dataset."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import medfed.algorithms.fedbn as fedbn_module
from medfed.algorithms import LocalTask, create_strategy
from medfed.algorithms.base import load_params, read_params
from medfed.algorithms.fedbn import LOCAL_BN
from medfed.algorithms.fedprox import proximal_term
from medfed.algorithms.scaffold import CLIENT_CONTROL, DELTA_CONTROL, SERVER_CONTROL
from medfed.client.train import TrainOptions, train_local
from medfed.types import Params

from ._helpers import (
    CPU,
    TINY_CNN_BN_KEYS,
    assert_params_equal,
    context_for,
    tiny_cnn,
    tiny_dataset,
)

OPTS = TrainOptions(epochs=2, batch_size=4, lr=0.05, momentum=0.0)
TRAINABLE = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"]


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(
    name: str,
    task: LocalTask,
    opts: TrainOptions = OPTS,
    options: dict | None = None,
    seed: int = 7,
):
    algo = create_strategy(name, options or {})
    model = tiny_cnn(123)  # the worker model: its own weights must not matter
    return algo.local_update(model, task, tiny_dataset(), opts, generator=gen(seed), device=CPU)


def global_params() -> Params:
    return read_params(tiny_cnn(0))


def dist(a: Params, b: Params, keys=TRAINABLE) -> float:
    return float(sum(torch.sum((a[k].double() - b[k].double()) ** 2) for k in keys) ** 0.5)


# --- FedProx ---


def test_fedprox_mu_zero_is_bit_identical_to_fedavg() -> None:
    task = LocalTask("a", 0, global_params())
    prox = run("fedprox", task, options={"mu": 0.0}).update
    avg = run("fedavg", task).update
    assert_params_equal(prox.params, avg.params)
    # train_local counts examples *seen*: 2 epochs x 16 images
    assert prox.num_examples == avg.num_examples == 32


def test_fedprox_large_mu_stays_closer_to_the_global() -> None:
    g = global_params()
    task = LocalTask("a", 0, g)
    free = dist(run("fedprox", task, options={"mu": 0.0}).update.params, g)
    tied = dist(run("fedprox", task, options={"mu": 10.0}).update.params, g)
    assert free > 0 and tied < 0.7 * free


def test_proximal_term_gradient_is_mu_times_distance() -> None:
    mu = 0.3
    module = nn.Module()
    module.p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    term = proximal_term(module, mu)  # anchor = [1, 2, 3]
    with torch.no_grad():
        module.p.copy_(torch.tensor([2.0, 0.0, 5.0]))
    value = term(module)
    value.backward()
    assert torch.allclose(value, torch.tensor(mu / 2 * (1 + 4 + 4)))
    assert torch.allclose(module.p.grad, mu * torch.tensor([1.0, -2.0, 2.0]))


def test_proximal_term_ignores_frozen_params() -> None:
    module = nn.Linear(2, 1)
    module.bias.requires_grad_(False)
    term = proximal_term(module, 1.0)
    with torch.no_grad():
        module.bias.add_(10.0)
    assert float(term(module).detach()) == 0.0


# --- SCAFFOLD ---


def controls(seed: int, scale: float) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(global_params()[k].shape, generator=g) for k in TRAINABLE}


def test_scaffold_control_variate_matches_the_hand_formula() -> None:
    x = global_params()
    c, c_i = controls(1, 0.05), controls(2, 0.05)
    task = LocalTask("a", 3, x, payload={SERVER_CONTROL: c}, client_state={CLIENT_CONTROL: c_i})
    result = run("scaffold", task)
    y = result.update.params
    steps = int(result.update.metrics["steps"])
    assert steps == 8  # 2 epochs x 16 / 4
    c_new = result.client_state[CLIENT_CONTROL]
    delta_c = result.update.extras[DELTA_CONTROL]
    assert set(c_new) == set(delta_c) == set(TRAINABLE)
    for k in TRAINABLE:
        hand = c_i[k].double() - c[k].double() + (x[k].double() - y[k].double()) / (steps * 0.05)
        torch.testing.assert_close(c_new[k].double(), hand, rtol=1e-6, atol=1e-6)
        assert torch.equal(delta_c[k], c_new[k] - c_i[k])
    # buffers have no control variate, and c_i never leaves the site
    assert CLIENT_CONTROL not in result.update.extras


def test_scaffold_with_zero_controls_trains_exactly_like_fedavg() -> None:
    x = global_params()
    zeros = {k: torch.zeros_like(x[k]) for k in TRAINABLE}
    task = LocalTask("a", 0, x, payload={SERVER_CONTROL: zeros})  # first round: no c_i yet
    sc = run("scaffold", task).update
    avg = run("fedavg", LocalTask("a", 0, x)).update
    assert_params_equal(sc.params, avg.params)
    # momentum in the options is overridden: SCAFFOLD's formula assumes plain SGD steps
    heavy = run("scaffold", task, opts=OPTS.model_copy(update={"momentum": 0.9})).update
    assert_params_equal(heavy.params, avg.params)
    assert heavy.metrics["momentum_overridden"] == 1.0


def test_scaffold_single_step_moves_by_minus_lr_times_correction() -> None:
    x = global_params()
    c, c_i = controls(3, 0.2), controls(4, 0.2)
    one = OPTS.model_copy(update={"max_steps": 1})
    task = LocalTask("a", 0, x, payload={SERVER_CONTROL: c}, client_state={CLIENT_CONTROL: c_i})
    corrected = run("scaffold", task, opts=one).update.params
    plain = run("fedavg", LocalTask("a", 0, x), opts=one).update.params
    for k in TRAINABLE:  # y = x - lr (g + c - c_i) = y_plain - lr (c - c_i)
        torch.testing.assert_close(corrected[k], plain[k] - 0.05 * (c[k] - c_i[k]))
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(corrected[k], plain[k])


def test_scaffold_rejects_adam_and_missing_control() -> None:
    x = global_params()
    c = {k: torch.zeros_like(x[k]) for k in TRAINABLE}
    with pytest.raises(ValueError):
        run(
            "scaffold",
            LocalTask("a", 0, x, payload={SERVER_CONTROL: c}),
            opts=OPTS.model_copy(update={"optimizer": "adam"}),
        )
    with pytest.raises(ValueError):
        run("scaffold", LocalTask("a", 0, x))


def test_scaffold_server_step_by_hand() -> None:
    model = tiny_cnn(0)
    x = read_params(model)
    algo = create_strategy("scaffold", {"server_lr": 0.5, "weighting": "uniform"})
    state = algo.init(x, context=context_for(model, n_sites=4))
    assert set(algo.payload(state)[SERVER_CONTROL]) == set(TRAINABLE)
    ys = [
        {k: v + float(i + 1) if v.is_floating_point() else v + 2 * (i + 1) for k, v in x.items()}
        for i in range(2)
    ]
    dcs = [{k: torch.full_like(x[k], float(i + 1)) for k in TRAINABLE} for i in range(2)]
    from medfed.types import ParamKind, Update

    ups = [
        Update(f"s{i}", ys[i], ParamKind.WEIGHTS, 10 * (i + 1), extras={DELTA_CONTROL: dcs[i]})
        for i in range(2)
    ]
    new, state = algo.aggregate(x, ups, state, round_idx=1)
    for k in TRAINABLE:  # x + 0.5 * mean(+1, +2) = x + 0.75
        torch.testing.assert_close(new[k], x[k] + 0.75)
        # c = 0 + (2 / 4) * mean(1, 2) = 0.75
        torch.testing.assert_close(state.buffers[SERVER_CONTROL][k], torch.full_like(x[k], 0.75))
    # buffers: plain (uniform here) mean, no server lr: running_mean + 1.5, counter + 3
    torch.testing.assert_close(new["bn.running_mean"], x["bn.running_mean"] + 1.5)
    assert int(new["bn.num_batches_tracked"]) == int(x["bn.num_batches_tracked"]) + 3


# --- FedBN ---


def test_fedbn_uploads_no_normalisation_keys() -> None:
    model = tiny_cnn(0)
    g = read_params(model)
    algo = create_strategy("fedbn")
    algo.init(g, context=context_for(model))
    assert algo.uploaded_keys() == frozenset(g) - TINY_CNN_BN_KEYS
    result = run("fedbn", LocalTask("a", 0, g))
    assert set(result.update.params) == set(g) - TINY_CNN_BN_KEYS
    assert set(result.client_state[LOCAL_BN]) == TINY_CNN_BN_KEYS


def test_fedbn_site_keeps_what_it_trained_and_starts_from_it(monkeypatch) -> None:
    model = tiny_cnn(0)
    g0 = read_params(model)
    algo = create_strategy("fedbn")
    state = algo.init(g0, context=context_for(model))

    # Round 1, reference by hand: plain training from the global, same generator.
    ref_model = copy.deepcopy(model)
    load_params(ref_model, g0, CPU)
    train_local(ref_model, tiny_dataset(), OPTS, generator=gen(), device=CPU)
    ref = read_params(ref_model)
    r1 = run("fedbn", LocalTask("a", 0, g0))
    for k in TINY_CNN_BN_KEYS:
        assert torch.equal(r1.client_state[LOCAL_BN][k], ref[k])
        assert not torch.equal(r1.client_state[LOCAL_BN][k], g0[k])

    other = run("fedbn", LocalTask("b", 0, g0), seed=99)
    g1, state = algo.aggregate(g0, [r1.update, other.update], state, round_idx=0)
    for k in TINY_CNN_BN_KEYS:  # the server never touches BN
        assert torch.equal(g1[k], g0[k])
    assert not torch.equal(g1["conv.weight"], g0["conv.weight"])

    # Round 2: training starts from global non-BN + this site's own BN.
    seen: dict[str, Params] = {}
    real = fedbn_module.train_local

    def spy(model, *args, **kwargs):
        seen["start"] = read_params(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(fedbn_module, "train_local", spy)
    r2 = run("fedbn", LocalTask("a", 1, g1, client_state=r1.client_state))
    expected = {
        k: r1.client_state[LOCAL_BN][k] if k in TINY_CNN_BN_KEYS else v for k, v in g1.items()
    }
    assert_params_equal(seen["start"], expected)
    assert int(r2.client_state[LOCAL_BN]["bn.num_batches_tracked"]) == 16  # 8 + 8 steps

    personal = algo.personalize(g1, r2.client_state)
    assert list(personal) == list(g1)
    for k, v in personal.items():
        src = r2.client_state[LOCAL_BN][k] if k in TINY_CNN_BN_KEYS else g1[k]
        assert torch.equal(v, src), k


def test_fedbn_finds_norm_layers_by_type_not_name() -> None:
    class Oddly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.GroupNorm(1, 2))
            self.bn_like_name = nn.Linear(2, 2)  # not a norm layer despite the name

    model = Oddly()
    g = read_params(model)
    algo = create_strategy("fedbn")
    algo.init(g, context=context_for(model))
    local = frozenset(g) - algo.uploaded_keys()
    assert local == {
        f"features.1.{s}"
        for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
