"""Memory grows with the sites that take part, never with the sites that are registered.

Held state is counted directly (live tensors' storages, found through the garbage collector,
site data excluded), not by timing or RSS, so the check is exact and fast.
"""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch

from medfed.algorithms import STRATEGIES
from medfed.algorithms.base import FederationContext, read_params
from medfed.client.train import TrainOptions
from medfed.config import VectorizeMode
from medfed.data.site import ArrayDataset
from medfed.models.factory import create_model
from medfed.runtime.inprocess import InProcessRuntime
from medfed.seeding import numpy_rng
from medfed.topologies.star import StarTopology
from medfed.types import Update

SAMPLED = 5
ROUNDS = 3


def _sites(registered: int) -> dict[str, ArrayDataset]:
    g = torch.Generator().manual_seed(0)
    pooled = torch.randint(0, 256, (registered * 8, 1, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 2, (registered * 8,), generator=g)
    # Index views of one pooled array: the data is resident once, however many sites.
    return {
        f"c{i:04d}": ArrayDataset(pooled[8 * i : 8 * i + 8], labels[8 * i : 8 * i + 8])
        for i in range(registered)
    }


def _storages(exclude: set[int]) -> dict[int, int]:
    """data_ptr -> bytes of every live tensor storage not in ``exclude``."""
    out: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in exclude:
                    out[storage.data_ptr()] = storage.nbytes()
    return out


def _held_after_rounds(
    registered: int, strategy: str, mode: VectorizeMode
) -> tuple[int, InProcessRuntime, set[str]]:
    """Bytes of tensors the federation holds after ROUNDS rounds with SAMPLED sites each."""
    data = _sites(registered)
    data_ptrs = {
        t.untyped_storage().data_ptr() for d in data.values() for t in (d.images, d.labels)
    }
    gc.collect()
    before = _storages(data_ptrs)
    torch.manual_seed(0)
    model = create_model("medfed:tinycnn", num_classes=2, in_chans=1, image_size=16)
    algo = STRATEGIES.create(strategy, {})
    params = read_params(model)
    state = algo.init(params, context=FederationContext(model=model, sites=tuple(data)))
    runtime = InProcessRuntime(
        model=model,
        algorithm=algo,
        data=data,
        opts=TrainOptions(batch_size=4, max_steps=2),
        device=torch.device("cpu"),
        seed=0,
        vectorize=mode,
        vector_min_clients=2,
    )
    topology = StarTopology(fraction=SAMPLED / registered, min_clients=SAMPLED)
    sampled: set[str] = set()
    for r in range(ROUNDS):
        plan = topology.plan(r, tuple(data), numpy_rng(0, "sample", r))
        sampled.update(plan.participants)
        outcomes = runtime.execute(r, list(plan.participants), params, algo.payload(state))
        updates = [o for o in outcomes if isinstance(o, Update)]
        assert len(updates) == SAMPLED
        params, state = algo.aggregate(params, updates, state, round_idx=r)
        del outcomes, updates
    gc.collect()
    after = _storages(data_ptrs)
    held = sum(nbytes for ptr, nbytes in after.items() if ptr not in before)
    assert held > 0  # the global model and the worker model at least
    return held, runtime, sampled


def _model_bytes() -> int:
    model = create_model("medfed:tinycnn", num_classes=2, in_chans=1, image_size=16)
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


@pytest.mark.parametrize("mode", [VectorizeMode.OFF, VectorizeMode.ON])
def test_fedavg_holds_the_same_bytes_for_10_and_200_registered_sites(mode: VectorizeMode) -> None:
    small, rt_small, _ = _held_after_rounds(10, "fedavg", mode)
    large, rt_large, _ = _held_after_rounds(200, "fedavg", mode)
    assert rt_small.client_states == {} and rt_large.client_states == {}
    # Nothing per registered site: at most a few model-sized buffers either way, and the two
    # federations hold the same amount to within one model.
    assert large <= small + _model_bytes()
    assert large < 8 * _model_bytes()


def test_scaffold_keeps_one_compact_control_variate_per_site_that_took_part() -> None:
    held, runtime, sampled = _held_after_rounds(200, "scaffold", VectorizeMode.ON)
    assert set(runtime.client_states) <= sampled and len(sampled) <= SAMPLED * ROUNDS
    trainable = _model_bytes()  # tinycnn: every state entry is a trainable float parameter
    for state in runtime.client_states.values():
        c_i = state["c_i"]
        assert all(v.device.type == "cpu" for v in c_i.values())  # off the accelerator
        assert sum(v.numel() * v.element_size() for v in c_i.values()) == trainable
    # Global model, server c, worker model, plus one c_i per site that took part.
    assert held <= (len(runtime.client_states) + 8) * trainable


def test_sampled_sites_differ_between_rounds() -> None:
    # The memory checks above mean something only if sampling visits new sites each round.
    rounds = [
        set(
            StarTopology(fraction=0.025, min_clients=5)
            .plan(r, tuple(_sites(200)), numpy_rng(0, "sample", r))
            .participants
        )
        for r in range(ROUNDS)
    ]
    assert len(set.union(*rounds)) > SAMPLED
    assert np.all([len(r) == SAMPLED for r in rounds])
