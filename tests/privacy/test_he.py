"""CKKS-encrypted FedAvg against two independent plaintext references.

References: medfed's own ``fedavg_aggregate`` (float64, cast back) and Flower's
``flwr.server.strategy.aggregate.aggregate`` (numpy, fed float64 arrays so that it is exact to
float64 rounding). Bounds asserted, on values of magnitude <= 4: max absolute error <= 1e-6
(measured: ~1e-8 from CKKS plus float32 rounding where the model is float32) and relative error
(max-norm of the error / max-norm of the reference) < 1e-4.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import tenseal as ts
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from medfed.algorithms.aggregate import fedavg_aggregate
from medfed.models.factory import create_model
from medfed.privacy.he import (
    EncryptedUpdate,
    HEKeys,
    HEOptions,
    HERoundStats,
    Layout,
    aggregate_encrypted,
    decrypt_aggregate,
    encrypt_params,
    he_fedavg,
    setup_keys,
)
from medfed.types import ParamKind, Params, Update

ABS_BOUND = 1e-6
REL_BOUND = 1e-4
SLOTS = 4096  # poly_modulus_degree 8192 // 2


@functools.cache
def keys() -> HEKeys:
    return setup_keys(HEOptions())


def flower_mean(updates: list[Update], global_params: Params, names: list[str]) -> Params:
    """Flower's FedAvg over ``names`` (weights = global + delta for DELTA updates)."""
    from flwr.server.strategy.aggregate import aggregate

    results = []
    for u in updates:
        arrays = []
        for k in names:
            v = u.params[k].double()
            if u.kind == ParamKind.DELTA:
                v = v + global_params[k].double()
            arrays.append(v.numpy())
        results.append((arrays, u.num_examples))
    return {
        k: torch.from_numpy(np.asarray(a)) for k, a in zip(names, aggregate(results), strict=True)
    }


def errors(got: Params, ref: Params, names: list[str]) -> tuple[float, float]:
    """(max absolute error, max-norm relative error) over ``names``."""
    diff = max(float((got[k].double() - ref[k].double()).abs().max()) for k in names)
    scale = max(float(ref[k].double().abs().max()) for k in names)
    return diff, diff / scale if scale else diff


def random_round(
    seed: int, shapes: list[tuple[int, ...]], counts: list[int], kinds: list[bool], scale: float
) -> tuple[Params, list[Update]]:
    g = torch.Generator().manual_seed(seed)
    global_params: Params = {
        f"layer{i}.weight": (torch.rand(s, generator=g, dtype=torch.float64) * 2 - 1) * scale
        for i, s in enumerate(shapes)
    }
    global_params["layer0.weight"] = global_params["layer0.weight"].float()  # mixed dtypes
    global_params["bn.num_batches_tracked"] = torch.tensor(7)
    updates = []
    for i, (n, is_delta) in enumerate(zip(counts, kinds, strict=True)):
        delta = {
            k: ((torch.rand(v.shape, generator=g, dtype=torch.float64) - 0.5) * scale).to(v.dtype)
            if v.is_floating_point()
            else torch.tensor(i)
            for k, v in global_params.items()
        }
        if is_delta:
            params, kind = delta, ParamKind.DELTA
        else:
            params = {
                k: (global_params[k] + d).to(global_params[k].dtype) for k, d in delta.items()
            }
            kind = ParamKind.WEIGHTS
        updates.append(Update(site=f"site{i}", params=params, kind=kind, num_examples=n))
    return global_params, updates


def small_cnn_state() -> Params:
    torch.manual_seed(0)
    model = create_model("medfed:smallcnn", num_classes=2, in_chans=1, image_size=64)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- options and keys ---


def test_options_validate_ranges() -> None:
    assert HEOptions().poly_modulus_degree == 8192
    assert HEOptions().coeff_mod_bit_sizes == [60, 40, 40, 60]
    assert HEOptions(poly_modulus_degree=16384, coeff_mod_bit_sizes=[60, 40, 40, 40, 60])
    for bad in (
        {"poly_modulus_degree": 6000},  # not a power of two
        {"poly_modulus_degree": 2048},  # < 4096
        {"coeff_mod_bit_sizes": [60, 60]},  # no level to rescale
        {"coeff_mod_bit_sizes": [60, 40, 70]},  # beyond SEAL's 60 bits
        {"coeff_mod_bit_sizes": [60, 30, 60]},  # rescale prime != scale
        {"coeff_mod_bit_sizes": [40, 40, 60]},  # no room above the scale
        {"coeff_mod_bit_sizes": [60, 40, 40, 40, 60]},  # 240 bits > 218 at N = 8192
        {"global_scale_bits": 10},
        {"n_threads": 4},  # unknown option
    ):
        with pytest.raises(ValidationError):
            HEOptions(**bad)
    with pytest.raises(ValidationError):
        HEOptions().global_scale_bits = 30  # type: ignore[misc]


def test_public_context_holds_no_secret_and_no_galois_keys() -> None:
    public = ts.context_from(keys().public_context)
    secret = ts.context_from(keys().secret_context)
    assert not public.is_private() and not public.has_secret_key()
    assert public.is_public() and public.has_public_key()
    assert secret.is_private() and secret.has_secret_key()
    assert not public.has_galois_keys() and not secret.has_galois_keys()
    assert not public.has_relin_keys()
    assert len(keys().public_context) < len(keys().secret_context)


def test_decrypting_at_the_aggregator_fails() -> None:
    params = {"w": torch.linspace(-1, 1, 10)}
    up = encrypt_params(params, context=keys().public_context, site="a", num_examples=3)
    agg = aggregate_encrypted([up], public_context=keys().public_context)
    with pytest.raises(ValueError, match="secret"):
        decrypt_aggregate(agg, secret_context=keys().public_context)
    # TenSEAL itself refuses too, whatever medfed checks.
    ctx = ts.context_from(keys().public_context)
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(ctx, agg.chunks[0]).decrypt()
    with pytest.raises(ValueError, match="aggregator must never hold the secret key"):
        aggregate_encrypted([up], public_context=keys().secret_context)
    assert torch.allclose(
        decrypt_aggregate(agg, secret_context=keys().secret_context)["w"],
        params["w"],
        atol=ABS_BOUND,
        rtol=0,
    )


# --- agreement with plaintext FedAvg ---


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    seed=st.integers(0, 2**31 - 1),
    shapes=st.lists(
        st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    sites=st.lists(st.tuples(st.integers(0, 500), st.booleans()), min_size=1, max_size=4),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 4.0]),
)
def test_he_fedavg_matches_medfed_and_flower(
    seed: int, shapes: list[tuple[int, ...]], sites: list[tuple[int, bool]], scale: float
) -> None:
    counts = [n for n, _ in sites]
    if sum(counts) == 0:
        counts[0] = 1
    global_params, updates = random_round(seed, shapes, counts, [d for _, d in sites], scale)
    got, stats = he_fedavg(global_params, updates, keys=keys(), expected_keys=None)
    ours = fedavg_aggregate(global_params, updates, None)
    floats = [k for k, v in global_params.items() if v.is_floating_point()]
    flower = flower_mean(updates, global_params, floats)
    for ref in (ours, flower):
        abs_err, rel_err = errors(got, ref, floats)
        assert abs_err <= ABS_BOUND and rel_err < REL_BOUND, (abs_err, rel_err)
    assert torch.equal(got["bn.num_batches_tracked"], ours["bn.num_batches_tracked"])
    for k, v in global_params.items():
        assert (got[k].dtype, got[k].shape, got[k].device) == (v.dtype, v.shape, v.device)
    assert stats.chunks_per_site == 1 and stats.bytes_up > stats.plaintext_bytes


def test_small_cnn_round_matches_plaintext_fedavg() -> None:
    """A real state dict: BatchNorm buffers, ~98k floats (24 chunks), mixed WEIGHTS/DELTA."""
    global_params = small_cnn_state()
    g = torch.Generator().manual_seed(1)
    updates = []
    for i, n in enumerate([120, 45, 300]):
        delta = {
            k: 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3 + i
            for k, v in global_params.items()
        }
        if i == 1:
            delta = {
                k: d if d.is_floating_point() else d - global_params[k] for k, d in delta.items()
            }
            updates.append(Update(f"site{i}", delta, ParamKind.DELTA, n))
        else:
            w = {k: global_params[k] + d if d.is_floating_point() else d for k, d in delta.items()}
            updates.append(Update(f"site{i}", w, ParamKind.WEIGHTS, n))
    got, stats = he_fedavg(global_params, updates, keys=keys(), expected_keys=None)
    ours = fedavg_aggregate(global_params, updates, None)
    floats = [k for k, v in global_params.items() if v.is_floating_point()]
    flower = flower_mean(updates, global_params, floats)
    for ref in (ours, flower):
        abs_err, rel_err = errors(got, ref, floats)
        assert abs_err <= ABS_BOUND and rel_err < REL_BOUND, (abs_err, rel_err)
    for k, v in global_params.items():
        assert (got[k].dtype, got[k].shape) == (v.dtype, v.shape)
        if not v.is_floating_point():
            assert torch.equal(got[k], ours[k])  # rounded in clear, exactly as FedAvg
    numel = sum(v.numel() for k, v in global_params.items() if v.is_floating_point())
    assert stats.chunks_per_site == -(-numel // SLOTS)
    assert isinstance(stats, HERoundStats) and stats.expansion > 10
    assert stats.encrypt_s > 0 and stats.aggregate_s > 0 and stats.decrypt_s > 0


def test_keys_outside_expected_keep_the_global_value() -> None:
    global_params = small_cnn_state()
    body = frozenset(k for k in global_params if not k.startswith("head."))
    updates = [
        Update(s, {k: global_params[k] * 0 + i for k in body}, ParamKind.WEIGHTS, 10)
        for i, s in enumerate(["a", "b"])
    ]
    got, _ = he_fedavg(global_params, updates, keys=keys(), expected_keys=body)
    assert torch.equal(got["head.weight"], global_params["head.weight"])
    assert list(got) == list(global_params)
    assert float((got["features.0.weight"] - 0.5).abs().max()) <= ABS_BOUND


def test_identical_updates_aggregate_to_themselves() -> None:
    """Magnitudes up to 100 in float64: TenSEAL's uncorrected rescale bias (1.3e-7 relative,
    1.3e-5 here) would fail this."""
    g = torch.Generator().manual_seed(3)
    params = {
        "a": (torch.rand(50, 30, generator=g, dtype=torch.float64) - 0.5) * 200,
        "b": torch.randn(17, generator=g, dtype=torch.float64),
    }
    updates = [Update(f"s{i}", params, ParamKind.WEIGHTS, n) for i, n in enumerate([1, 7, 50])]
    got, _ = he_fedavg(
        {k: v * 0 for k, v in params.items()}, updates, keys=keys(), expected_keys=None
    )
    abs_err, _ = errors(got, params, list(params))
    assert abs_err <= ABS_BOUND, abs_err


def test_result_is_independent_of_client_order() -> None:
    global_params, updates = random_round(5, [(20, 3), (9,)], [3, 0, 8, 2], [False, True] * 2, 1.0)
    first, _ = he_fedavg(global_params, updates, keys=keys(), expected_keys=None)
    again, _ = he_fedavg(global_params, updates[::-1], keys=keys(), expected_keys=None)
    # Encryption is randomised, so two runs differ by CKKS noise, never by more.
    floats = [k for k, v in global_params.items() if v.is_floating_point()]
    assert errors(first, again, floats)[0] <= ABS_BOUND
    assert torch.equal(first["bn.num_batches_tracked"], again["bn.num_batches_tracked"])
    # The same ciphertexts in any order give the same bytes: ciphertext sums are exact modular
    # arithmetic.
    enc = [
        encrypt_params(u.params, context=keys().public_context, site=u.site, num_examples=5 + i)
        for i, u in enumerate(updates)
        if u.kind == ParamKind.WEIGHTS
    ]
    forward = aggregate_encrypted(enc, public_context=keys().public_context)
    backward = aggregate_encrypted(enc[::-1], public_context=keys().public_context)
    assert forward.chunks == backward.chunks and forward.sites == ("site0", "site2")


# --- layouts and chunks ---


def test_mismatched_layout_names_the_site() -> None:
    pub = keys().public_context
    a = encrypt_params({"w": torch.zeros(4, 3)}, context=pub, site="alpha", num_examples=1)
    b = encrypt_params({"w": torch.zeros(3, 4)}, context=pub, site="bravo", num_examples=1)
    with pytest.raises(ValueError, match=r"'bravo'.*'w' has shape \(3, 4\)"):
        aggregate_encrypted([a, b], public_context=pub)
    c = encrypt_params({"v": torch.zeros(12)}, context=pub, site="charlie", num_examples=1)
    with pytest.raises(ValueError, match="'charlie'"):
        aggregate_encrypted([a, c], public_context=pub)
    d = encrypt_params(
        {"w": torch.zeros(4, 3, dtype=torch.float64)}, context=pub, site="delta", num_examples=1
    )
    with pytest.raises(ValueError, match="'delta'.*dtype"):
        aggregate_encrypted([a, d], public_context=pub)
    truncated = dataclasses.replace(a, site="echo", chunks=())
    with pytest.raises(ValueError, match="'echo' has 0 chunks"):
        aggregate_encrypted([a, truncated], public_context=pub)
    # Through he_fedavg, validation names the site before anything is encrypted.
    g = {"w": torch.zeros(4, 3)}
    ups = [
        Update("ok", g, ParamKind.WEIGHTS, 1),
        Update("odd", {"w": torch.zeros(3, 4)}, ParamKind.WEIGHTS, 1),
    ]
    with pytest.raises(ValueError, match="'odd'"):
        he_fedavg(g, ups, keys=keys(), expected_keys=None)


def test_chunks_never_exceed_slots_and_large_tensors_round_trip() -> None:
    g = torch.Generator().manual_seed(4)
    params = {
        "big": torch.randn(3 * SLOTS + 5, generator=g),  # spans four chunks
        "small": torch.randn(2, 3, generator=g, dtype=torch.float64),  # packed after it
        "steps": torch.tensor(11),  # not encrypted
    }
    up = encrypt_params(params, context=keys().public_context, site="s", num_examples=4)
    assert isinstance(up, EncryptedUpdate)
    assert up.layout == Layout.of(params) and up.layout.unencrypted == ("steps",)
    assert up.layout.numel == 3 * SLOTS + 11 and len(up.chunks) == 4
    ctx = ts.context_from(keys().public_context)
    sizes = [ts.ckks_vector_from(ctx, c).size() for c in up.chunks]
    assert sizes == [SLOTS, SLOTS, SLOTS, 11] and max(sizes) <= SLOTS
    assert up.nbytes == sum(len(c) for c in up.chunks)
    agg = aggregate_encrypted([up], public_context=keys().public_context)
    out = decrypt_aggregate(agg, secret_context=keys().secret_context)
    assert set(out) == {"big", "small"}
    for k in out:
        assert out[k].dtype == params[k].dtype and out[k].shape == params[k].shape
        assert float((out[k].double() - params[k].double()).abs().max()) <= ABS_BOUND


def test_zero_weight_sites_count_for_nothing() -> None:
    pub = keys().public_context
    a = encrypt_params({"w": torch.ones(5)}, context=pub, site="a", num_examples=0)
    b = encrypt_params({"w": torch.full((5,), 2.0)}, context=pub, site="b", num_examples=9)
    out = decrypt_aggregate(
        aggregate_encrypted([a, b], public_context=pub), secret_context=keys().secret_context
    )
    assert float((out["w"] - 2).abs().max()) <= ABS_BOUND
    with pytest.raises(ValueError, match="sum to zero"):
        aggregate_encrypted([a], public_context=pub)


def test_bad_inputs_are_refused() -> None:
    pub = keys().public_context
    with pytest.raises(ValueError, match="non-finite"):
        encrypt_params(
            {"w": torch.tensor([1.0, float("nan")])}, context=pub, site="s", num_examples=1
        )
    with pytest.raises(ValueError, match="num_examples"):
        encrypt_params({"w": torch.ones(2)}, context=pub, site="s", num_examples=-1)
    with pytest.raises(ValueError, match="not a serialized TenSEAL context"):
        encrypt_params({"w": torch.ones(2)}, context=b"garbage", site="s", num_examples=1)
    a = encrypt_params({"w": torch.ones(2)}, context=pub, site="s", num_examples=1)
    with pytest.raises(ValueError, match="duplicate"):
        aggregate_encrypted([a, a], public_context=pub)
    with pytest.raises(ValueError, match="no encrypted updates"):
        aggregate_encrypted([], public_context=pub)
