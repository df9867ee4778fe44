"""Canonical encodings against hand-built references (hashlib and numpy, not our code path)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from medfed.audit.canonical import (
    EncodingError,
    canonical_json,
    file_digest,
    is_canonical,
    jsonable,
    tensor_digest,
)


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": [1.5, None, True], "é": "ü"}) == (
        '{"a":[1.5,null,true],"b":1,"é":"ü"}'.encode()
    )


def test_non_finite_floats_are_tagged_not_lost():
    assert canonical_json([math.nan, math.inf, -math.inf]) == (
        b'[{"$float":"nan"},{"$float":"inf"},{"$float":"-inf"}]'
    )


def test_keys_must_be_strings():
    with pytest.raises(EncodingError, match="body.x"):
        canonical_json({"x": {1: 2}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(json_values)
def test_the_encoding_is_a_fixed_point_and_round_trips_floats(value):
    blob = canonical_json(value)
    assert is_canonical(blob)
    assert json.loads(blob) == jsonable(value) or _has_nan(value)


def _has_nan(v) -> bool:
    if isinstance(v, float):
        return math.isnan(v)
    if isinstance(v, dict):
        return any(_has_nan(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_nan(x) for x in v)
    return False


def _reference_digest(tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> str:
    """The documented encoding, written out with hashlib + numpy's own byte order handling."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.asarray(tensors[name], order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header = json.dumps([name, dtypes[name], list(a.shape), len(data)], separators=(",", ":"))
        h.update(header.encode() + b"\n" + data)
    return h.hexdigest()


def test_tensor_digest_matches_the_documented_encoding():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, -2], dtype=np.int64)
    c = np.array(True)
    ours = tensor_digest(
        {"w": torch.from_numpy(a), "b": torch.from_numpy(b), "c": torch.from_numpy(c)}
    )
    ref = _reference_digest({"w": a, "b": b, "c": c}, {"w": "float32", "b": "int64", "c": "bool"})
    assert ours == ref


def test_tensor_digest_sees_order_values_dtype_shape_and_layout():
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base = tensor_digest({"a": w, "b": w + 1})
    assert tensor_digest({"b": w + 1, "a": w}) == base  # insertion order does not matter
    assert tensor_digest({"a": w.t().contiguous().t(), "b": w + 1}) == base  # layout neither
    changed = w.clone()
    changed[1, 2] += 1e-6
    assert tensor_digest({"a": changed, "b": w + 1}) != base
    assert tensor_digest({"a": w.reshape(3, 2), "b": w + 1}) != base  # same bytes, other shape
    assert tensor_digest({"a": w.view(torch.int32), "b": w + 1}) != base  # same bytes, other dtype
    assert tensor_digest({"a": w, "c": w + 1}) != base  # other name


def test_bfloat16_and_empty_tensors_have_digests():
    x = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    raw = x.view(torch.int16).numpy()
    ref = _reference_digest(
        {"x": raw, "e": np.zeros((0, 3), np.float32)}, {"x": "bfloat16", "e": "float32"}
    )
    assert tensor_digest({"x": x, "e": torch.zeros(0, 3)}) == ref


def test_file_digest(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    assert file_digest(p) == hashlib.sha256(b"abc" * 1000).hexdigest()
