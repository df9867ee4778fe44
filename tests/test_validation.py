import torch

from medfed.types import ParamKind, Update
from medfed.validation import validate_update

GLOBAL = {
    "w": torch.ones(2, 3),
    "b": torch.zeros(3),
    "bn.num_batches_tracked": torch.tensor(4, dtype=torch.long),
}


def upd(params, **kw):
    return Update(
        site="a",
        params=params,
        kind=kw.pop("kind", ParamKind.WEIGHTS),
        num_examples=kw.pop("n", 10),
        **kw,
    )


def check(update, keys=None, ratio=10.0):
    return validate_update(update, GLOBAL, expected_keys=keys, max_relative_norm=ratio)


def good():
    return {k: v.clone() + (0.1 if v.is_floating_point() else 0) for k, v in GLOBAL.items()}


def test_valid_update_passes():
    assert check(upd(good())) is None


def test_missing_and_extra_keys_are_named():
    p = good()
    del p["b"]
    assert "missing" in check(upd(p)) and "'b'" in check(upd(p))
    p = good()
    p["evil"] = torch.zeros(1)
    assert "unexpected" in check(upd(p)) and "evil" in check(upd(p))


def test_wrong_shape_and_dtype_named():
    p = good()
    p["w"] = torch.ones(3, 2)
    assert check(upd(p)) == "params: 'w' has shape (3, 2), expected (2, 3)"
    p = good()
    p["w"] = p["w"].double()
    assert "dtype" in check(upd(p)) and "'w'" in check(upd(p))


def test_non_finite_rejected():
    p = good()
    p["b"][1] = float("nan")
    p["b"][2] = float("inf")
    assert check(upd(p)) == "params: 'b' has 2 non-finite (NaN/Inf) values"


def test_absurd_norm_rejected_relative_to_global():
    # ||global|| = sqrt(6); delta of 100 in every w entry -> ||delta|| = 100*sqrt(6) = 100x
    p = good()
    p["w"] = GLOBAL["w"] + 100.0
    assert "exceeds 10" in check(upd(p))
    assert check(upd(p), ratio=200.0) is None


def test_delta_kind_norm_uses_update_itself():
    d = {k: torch.zeros_like(v) for k, v in GLOBAL.items()}
    d["w"] = torch.full((2, 3), 100.0)
    assert "exceeds" in check(upd(d, kind=ParamKind.DELTA))


def test_expected_keys_subset_for_fedbn_like_uploads():
    p = {"w": GLOBAL["w"].clone()}
    assert check(upd(p), keys={"w"}) is None
    assert "missing" in check(upd(p))


def test_non_positive_examples_and_nan_metrics():
    assert "num_examples" in check(upd(good(), n=0))
    assert "metric 'train_loss'" in check(upd(good(), metrics={"train_loss": float("nan")}))


def test_extras_checked():
    bad = {"delta_c": {"w": torch.full((2, 3), float("inf"))}}
    assert "extras['delta_c']" in check(upd(good(), extras=bad))
