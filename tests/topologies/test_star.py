import numpy as np
import pytest

from medfed.topologies.star import StarTopology

SITES = [f"s{i}" for i in range(10)]


def test_full_participation_keeps_order():
    plan = StarTopology(fraction=1.0, min_clients=2).plan(0, SITES, np.random.default_rng(0))
    assert plan.participants == tuple(SITES)


@pytest.mark.parametrize("fraction,min_clients,expected", [(0.3, 1, 3), (0.1, 4, 4), (0.25, 2, 3)])
def test_sample_size_is_max_of_fraction_and_minimum(fraction, min_clients, expected):
    topo = StarTopology(fraction=fraction, min_clients=min_clients)
    plan = topo.plan(3, SITES, np.random.default_rng(1))
    assert len(plan.participants) == expected
    assert len(set(plan.participants)) == expected
    assert set(plan.participants) <= set(SITES)


def test_sampling_is_deterministic_and_varies_by_round():
    topo = StarTopology(fraction=0.3, min_clients=1)
    a = topo.plan(0, SITES, np.random.default_rng(7))
    b = topo.plan(0, SITES, np.random.default_rng(7))
    assert a == b
    draws = {topo.plan(r, SITES, np.random.default_rng(r)).participants for r in range(20)}
    assert len(draws) > 1


def test_min_clients_above_federation_size_errors():
    with pytest.raises(ValueError, match="min_clients=11"):
        StarTopology(min_clients=11).plan(0, SITES, np.random.default_rng(0))
