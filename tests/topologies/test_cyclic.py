"""Cyclic weight transfer's visit order: fixed repeats the federation, shuffled permutes it."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medfed.seeding import numpy_rng
from medfed.topologies.cyclic import CyclicOrder, visit_order

SITES = ["a", "b", "c", "d", "e"]


def test_fixed_order_is_the_federations_order_every_cycle():
    rng = np.random.default_rng(0)
    for cycle in range(3):
        assert visit_order(SITES, cycle, order=CyclicOrder.FIXED, rng=rng) == SITES


def test_shuffled_order_is_reproducible_from_the_cycle_and_varies_between_cycles():
    def order(cycle: int) -> list[str]:
        return visit_order(SITES, cycle, order=CyclicOrder.SHUFFLED, rng=numpy_rng(0, "c", cycle))

    assert order(3) == order(3)  # a resumed run draws what an uninterrupted one drew
    assert len({tuple(order(c)) for c in range(10)}) > 1


@given(
    st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=8, unique=True),
    st.integers(0, 1000),
)
def test_shuffled_order_visits_every_site_exactly_once(sites, seed):
    got = visit_order(sites, 0, order=CyclicOrder.SHUFFLED, rng=np.random.default_rng(seed))
    assert sorted(got) == sorted(sites)


@pytest.mark.parametrize(
    "sites,cycle,match",
    [([], 0, "at least one site"), (["a", "a"], 0, "unique"), (["a"], -1, "cycle must be")],
)
def test_bad_input_is_an_error(sites, cycle, match):
    with pytest.raises(ValueError, match=match):
        visit_order(sites, cycle, order=CyclicOrder.FIXED, rng=np.random.default_rng(0))
