import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from medfed.metrics.classification import accuracy, multiclass_auc, roc_auc


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=60).filter(
        lambda xs: len({x[0] for x in xs}) == 2
    )
)
def test_auc_matches_sklearn_with_ties(cases):
    y = np.array([c[0] for c in cases])
    s = np.array([c[1] for c in cases], dtype=float)  # few distinct values -> many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_hand_example():
    # positives 0.8, 0.4; negatives 0.5, 0.1 -> pairs won: (0.8>0.5, 0.8>0.1, 0.4>0.1) = 3 of 4
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(0.75)


def test_auc_single_class_is_nan():
    assert np.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_multiclass_auc_matches_sklearn_ovr_macro():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet([1, 1, 1], 200)
    ref = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert multiclass_auc(y, p) == pytest.approx(ref, abs=1e-12)


def test_accuracy_hand():
    assert accuracy([0, 1, 1], np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])) == pytest.approx(
        2 / 3
    )
