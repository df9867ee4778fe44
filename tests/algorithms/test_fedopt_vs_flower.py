"""FedAdam / FedYogi / FedAdagrad against Flower's strategies on the same client results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedYogi
from torch import nn

from medfed.algorithms import create_strategy
from medfed.algorithms.fedopt import Moment
from medfed.types import ParamKind, Params, StrategyState, Update

from ._helpers import TinyNet, context_for, global_of, to_numpy_list

FLOWER = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
# Non-default hyper-parameters so that a mix-up of options would show.
OPTIONS = {
    "fedadam": {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3},
    "fedyogi": {"eta": 0.03, "beta_1": 0.7, "beta_2": 0.9, "tau": 1e-2},
    "fedadagrad": {"eta": 0.2, "tau": 1e-4},
}


def mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(dtype)


def client_params(global_params: Params, seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
        for k, v in global_params.items()
    }


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("name", sorted(FLOWER))
def test_fedopt_matches_flower_over_three_rounds(
    name: str, dtype: torch.dtype, rtol: float
) -> None:
    model = mlp(dtype)
    keys = list(model.state_dict())
    global_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ours = create_strategy(name, OPTIONS[name])
    state = ours.init(global_params, context=context_for(model))
    flower_opts = dict(OPTIONS[name])
    flower = FLOWER[name](
        initial_parameters=ndarrays_to_parameters(to_numpy_list(global_params, keys)),
        **flower_opts,
    )
    nums = [10, 3, 25]
    for server_round in (1, 2, 3):
        clients = [client_params(global_params, 100 * server_round + i) for i in range(3)]
        results = [
            (
                None,
                FitRes(
                    status=Status(Code.OK, ""),
                    parameters=ndarrays_to_parameters(to_numpy_list(p, keys)),
                    num_examples=n,
                    metrics={},
                ),
            )
            for p, n in zip(clients, nums, strict=True)
        ]
        ref_params, _ = flower.aggregate_fit(server_round, results, [])  # type: ignore[arg-type]
        assert ref_params is not None
        ref = parameters_to_ndarrays(ref_params)
        updates = [
            Update(f"site{i}", p, ParamKind.WEIGHTS, n)
            for i, (p, n) in enumerate(zip(clients, nums, strict=True))
        ]
        global_params, state = ours.aggregate(global_params, updates, state, round_idx=server_round)
        assert state.round == server_round
        for k, r in zip(keys, ref, strict=True):
            assert global_params[k].dtype == dtype
            np.testing.assert_allclose(global_params[k].double().numpy(), r, rtol=rtol, atol=rtol)
        # the moments too (Flower keeps them as m_t / v_t)
        for group, theirs in ((Moment.M, flower.m_t), (Moment.V, flower.v_t)):
            for k, r in zip(keys, theirs, strict=True):
                np.testing.assert_allclose(
                    state.buffers[group][k].double().numpy(), r, rtol=rtol, atol=rtol
                )


def test_fedadagrad_rejects_beta_2_and_typos() -> None:
    with pytest.raises(ValueError):
        create_strategy("fedadagrad", {"beta_2": 0.9})
    with pytest.raises(ValueError):
        create_strategy("fedadam", {"eta": 0.1, "beta1": 0.9})
    with pytest.raises(ValueError):
        create_strategy("fedyogi", {"tau": 0.0})


@pytest.mark.parametrize("name", sorted(FLOWER))
def test_buffers_take_the_weighted_mean_not_the_optimizer_step(name: str) -> None:
    model = TinyNet()
    global_params = global_of(model)
    algo = create_strategy(name)
    state = algo.init(global_params, context=context_for(model))
    buffer_keys = {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    assert set(state.buffers[Moment.M]) == set(global_params) - buffer_keys
    a = {k: v.clone() for k, v in global_params.items()}
    b = {k: v.clone() for k, v in global_params.items()}
    a["norm.running_mean"] = torch.full((4,), 1.0)
    b["norm.running_mean"] = torch.full((4,), 4.0)
    a["norm.num_batches_tracked"] = torch.tensor(10)
    b["norm.num_batches_tracked"] = torch.tensor(13)
    a["fc1.bias"] = global_params["fc1.bias"] + 1.0
    b["fc1.bias"] = global_params["fc1.bias"] + 1.0
    ups = [Update("a", a, ParamKind.WEIGHTS, 2), Update("b", b, ParamKind.WEIGHTS, 1)]
    new, new_state = algo.aggregate(global_params, ups, state, round_idx=1)
    assert torch.allclose(new["norm.running_mean"], torch.full((4,), 2.0))  # (2*1 + 4)/3
    assert int(new["norm.num_batches_tracked"]) == 11  # (20 + 13)/3 = 11
    # the trainable bias moved by an optimizer step, not to the mean (+1)
    step = new["fc1.bias"] - global_params["fc1.bias"]
    assert torch.all(step > 0) and not torch.allclose(step, torch.ones(4))
    assert new_state.round == state.round + 1 and isinstance(new_state, StrategyState)
