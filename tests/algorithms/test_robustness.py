"""Robust rules against one malicious site among six; FedAvg as the control that must break."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfed.algorithms import create_strategy
from medfed.types import ParamKind, Params, Update

from ._helpers import context_for

ROBUST = [
    ("median", {}),
    ("trimmed_mean", {}),  # default 0.2: cuts floor(1.2) = 1 value at each end
    ("krum", {"num_malicious": 1}),
    ("krum", {"num_malicious": 1, "num_selected": 3}),  # multi-Krum
]


def flat(p: Params) -> torch.Tensor:
    return torch.cat([v.double().reshape(-1) for v in p.values()])


def unflat(v: torch.Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = v[i : i + t.numel()].reshape(t.shape).to(t.dtype)
        i += t.numel()
    return out


def scenario(attack: str, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(20, 5)
    global_params = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    dim = sum(v.numel() for v in global_params.values())
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    honest = [mu + 0.01 * torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(5)]
    if attack == "scaled":
        bad = 100.0 * honest[0]
    elif attack == "sign_flip":
        bad = -10.0 * mu
    else:  # large Gaussian noise
        bad = mu + 10.0 * torch.randn(dim, generator=g, dtype=torch.float64)
    vectors = honest + [bad]
    updates = [
        Update(f"site{i}", unflat(v, global_params), ParamKind.WEIGHTS, 100)
        for i, v in enumerate(vectors)
    ]
    # the attacker also lies about its size: it must not buy influence
    updates[-1] = Update("site5", updates[-1].params, ParamKind.WEIGHTS, 10_000)
    return model, global_params, updates, mu


def aggregate(name: str, options: dict, attack: str, seed: int = 0) -> tuple[float, float]:
    model, global_params, updates, mu = scenario(attack, seed)
    algo = create_strategy(name, options)
    state = algo.init(global_params, context=context_for(model, 6))
    new, _ = algo.aggregate(global_params, updates, state, round_idx=1)
    return float(torch.linalg.norm(flat(new) - mu)), float(torch.linalg.norm(mu))


@pytest.mark.parametrize("attack", ["scaled", "sign_flip", "gaussian"])
@pytest.mark.parametrize("name,options", ROBUST)
def test_robust_rules_stay_near_the_honest_mean(name: str, options: dict, attack: str) -> None:
    for seed in range(3):
        err, scale = aggregate(name, options, attack, seed)
        assert err < 0.1 * scale, (name, attack, seed, err / scale)


@pytest.mark.parametrize("attack", ["scaled", "sign_flip", "gaussian"])
def test_fedavg_is_not_robust(attack: str) -> None:
    err, scale = aggregate("fedavg", {}, attack)
    assert err > 0.5 * scale


@pytest.mark.parametrize("attack", ["scaled", "sign_flip", "gaussian"])
def test_krum_never_selects_the_attacker(attack: str) -> None:
    model, global_params, updates, _ = scenario(attack)
    from medfed.algorithms.aggregate import krum_order

    order = krum_order([u.params for u in updates], num_malicious=1)
    assert order[-1] == 5  # the attacker scores worst
