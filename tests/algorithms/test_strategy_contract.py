"""Contracts every registered strategy meets -- parametrized over ``STRATEGIES.names()``, so a
newly registered strategy is covered without touching this file.

If a new strategy needs extras in its updates beyond SCAFFOLD's ``delta_c``, extend
``_helpers.make_update``.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from medfed.algorithms import STRATEGIES, Algorithm, create_strategy
from medfed.types import ParamKind, Params, StrategyState

from ._helpers import (
    assert_params_equal,
    context_for,
    control_delta,
    expected_keys,
    global_of,
    make_update,
    random_params_like,
    tiny_model,
)

NAMES = STRATEGIES.names()
HYP = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def setup(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    model = tiny_model(seed, dtype)
    global_params = global_of(model, seed + 1)
    algo = create_strategy(name)
    state = algo.init(global_params, context=context_for(model))
    return algo, model, global_params, state


def random_updates(
    algo: Algorithm, model, global_params: Params, nums, kinds, seed: int, quantized=False
):
    g = torch.Generator().manual_seed(seed)
    keys = expected_keys(algo, global_params)
    return [
        make_update(
            f"site{i}",
            random_params_like(global_params, keys, g, quantized=quantized),
            n,
            global_params=global_params,
            kind=kind,
            delta_c=control_delta(global_params, model, g),
        )
        for i, (n, kind) in enumerate(zip(nums, kinds, strict=True))
    ]


def assert_states_equal(a: StrategyState, b: StrategyState) -> None:
    assert a.round == b.round
    assert dict(a.scalars) == dict(b.scalars)
    assert set(a.buffers) == set(b.buffers)
    for group in a.buffers:
        assert_params_equal(dict(a.buffers[group]), dict(b.buffers[group]))


def one_round_warm_state(algo, model, global_params, state, seed: int):
    """Take one aggregation step so that moments / control variates are non-zero."""
    ups = random_updates(algo, model, global_params, [3, 5, 2], [ParamKind.WEIGHTS] * 3, seed)
    return algo.aggregate(global_params, ups, state, round_idx=1)


client_counts = st.lists(st.integers(1, 1000), min_size=1, max_size=5)
kinds = st.sampled_from([ParamKind.WEIGHTS, ParamKind.DELTA])


@pytest.mark.parametrize("name", NAMES)
@HYP
@given(nums=client_counts, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_client_order_does_not_matter(name: str, nums: list[int], seed: int, data) -> None:
    # float64 so that summation order is not hidden by a final cast; quantized values so that
    # ties (Krum scores, medians) actually occur.
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    quantized = data.draw(st.booleans(), label="quantized")
    algo, model, global_params, state = setup(name, dtype)
    if data.draw(st.booleans(), label="warm state"):
        global_params, state = one_round_warm_state(algo, model, global_params, state, seed)
    ks = data.draw(st.lists(kinds, min_size=len(nums), max_size=len(nums)), label="kinds")
    ups = random_updates(algo, model, global_params, nums, ks, seed, quantized)
    perm = data.draw(st.permutations(range(len(ups))), label="permutation")
    a, sa = algo.aggregate(global_params, ups, state, round_idx=2)
    b, sb = algo.aggregate(global_params, [ups[i] for i in perm], state, round_idx=2)
    assert_params_equal(a, b)  # bit-identical, not just close
    assert_states_equal(sa, sb)


@pytest.mark.parametrize("name", NAMES)
@HYP
@given(nums=client_counts, kind=kinds, seed=st.integers(0, 2**31 - 1))
def test_updates_equal_to_global_leave_it_unchanged(
    name: str, nums: list[int], kind: ParamKind, seed: int
) -> None:
    algo, model, global_params, state = setup(name, seed=seed % 7)
    keys = expected_keys(algo, global_params)
    dc = control_delta(global_params, model, torch.Generator())
    zero_dc = {k: torch.zeros_like(v) for k, v in dc.items()}
    ups = [
        make_update(
            f"s{i}",
            {k: global_params[k].clone() for k in keys},
            n,
            global_params=global_params,
            kind=kind,
            delta_c=zero_dc,
        )
        for i, n in enumerate(nums)
    ]
    new, new_state = algo.aggregate(global_params, ups, state, round_idx=1)
    assert_params_equal(new, global_params)
    assert new_state.round == state.round + 1


@pytest.mark.parametrize("name", NAMES)
@HYP
@given(nums=client_counts, seed=st.integers(0, 2**31 - 1))
def test_identical_updates_aggregate_to_themselves_iff_declared(
    name: str, nums: list[int], seed: int
) -> None:
    algo, model, global_params, state = setup(name)
    g = torch.Generator().manual_seed(seed)
    keys = expected_keys(algo, global_params)
    w = random_params_like(global_params, keys, g)
    dc = control_delta(global_params, model, g)
    ups = [
        make_update(f"s{i}", w, n, global_params=global_params, delta_c=dc)
        for i, n in enumerate(nums)
    ]
    new, _ = algo.aggregate(global_params, ups, state, round_idx=1)
    expected = {k: w.get(k, v) for k, v in global_params.items()}
    if algo.preserves_consensus:
        assert_params_equal(new, expected)
    else:
        # the declaration must be honest both ways: a server optimizer step does not land on W
        floats = [k for k in expected if expected[k].is_floating_point()]
        assert any(not torch.equal(new[k], expected[k]) for k in floats)


def test_fedavg_of_one_client_is_that_client() -> None:
    algo, model, global_params, state = setup("fedavg")
    w = random_params_like(global_params, list(global_params), torch.Generator().manual_seed(3))
    new, _ = algo.aggregate(
        global_params, [make_update("only", w, 17, global_params=global_params)], state, round_idx=1
    )
    assert_params_equal(new, w)


def test_every_averaging_rule_is_declared_as_such() -> None:
    declared = {n for n in NAMES if create_strategy(n).preserves_consensus}
    assert {"fedavg", "fedprox", "fedbn", "scaffold", "median", "trimmed_mean", "krum"} <= declared
    assert not declared & {"fedadam", "fedyogi", "fedadagrad"}
    assert not create_strategy("scaffold", {"server_lr": 0.5}).preserves_consensus


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_output_has_the_globals_keys_shapes_and_dtypes(name: str, dtype: torch.dtype) -> None:
    algo, model, global_params, state = setup(name, dtype)
    ups = random_updates(algo, model, global_params, [4, 9, 1, 6], [ParamKind.WEIGHTS] * 4, 5)
    for round_idx in (1, 2):
        new, state = algo.aggregate(global_params, ups, state, round_idx=round_idx)
        assert list(new) == list(global_params)
        for k in global_params:
            assert new[k].shape == global_params[k].shape, k
            assert new[k].dtype == global_params[k].dtype, k
            assert new[k].device == global_params[k].device, k
            assert torch.isfinite(new[k].double()).all(), k
        global_params = new


@pytest.mark.parametrize("name", NAMES)
def test_state_checkpoints_as_safetensors_and_json(name: str) -> None:
    algo, model, global_params, state = setup(name)
    _, state = one_round_warm_state(algo, model, global_params, state, 11)
    json.dumps({"round": state.round, "scalars": dict(state.scalars)})
    for group, tensors in state.buffers.items():
        blob = st_save({k: v.contiguous() for k, v in tensors.items()})
        back = st_load(blob)
        assert set(back) == set(tensors), group
        for k, v in tensors.items():
            assert torch.equal(back[k], v)


@pytest.mark.parametrize("name", NAMES)
def test_aggregate_is_pure(name: str) -> None:
    algo, model, global_params, state = setup(name)
    ups = random_updates(algo, model, global_params, [2, 3], [ParamKind.WEIGHTS] * 2, 1)
    before = {k: v.clone() for k, v in global_params.items()}
    ups_before = [{k: v.clone() for k, v in u.params.items()} for u in ups]
    a, sa = algo.aggregate(global_params, ups, state, round_idx=1)
    b, sb = algo.aggregate(global_params, ups, state, round_idx=1)
    assert_params_equal(a, b)
    assert_states_equal(sa, sb)
    assert_params_equal(global_params, before)
    for u, p in zip(ups, ups_before, strict=True):
        assert_params_equal(dict(u.params), p)


@pytest.mark.parametrize("name", NAMES)
def test_rejects_updates_with_wrong_keys(name: str) -> None:
    algo, model, global_params, state = setup(name)
    (good,) = random_updates(algo, model, global_params, [2], [ParamKind.WEIGHTS], 1)
    params = dict(good.params)
    params.pop(random.Random(0).choice(sorted(params)))
    bad = make_update("bad", params, 2, global_params=global_params)
    with pytest.raises(ValueError):
        algo.aggregate(global_params, [good, bad], state, round_idx=1)


@pytest.mark.parametrize("name", NAMES)
def test_personalize_default_is_global_except_fedbn(name: str) -> None:
    algo, _, global_params, _ = setup(name)
    if name != "fedbn":
        assert algo.personalize(global_params, {}) is global_params
        assert algo.uploaded_keys() is None
    else:
        assert_params_equal(algo.personalize(global_params, {}), global_params)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_are_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        create_strategy(name, {"definitely_not_an_option": 1})
