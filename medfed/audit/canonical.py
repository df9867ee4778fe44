"""Canonical byte encodings: the same facts always hash to the same digest, on any machine.

Two encodings are defined here, and another implementation can reproduce both from this text:

**Canonical JSON** (entry bodies, signed payloads): ``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` encoded as UTF-8. Floats are written
with Python's shortest round-trip ``repr``; a non-finite float (a NaN training loss from a broken
site) is written as the object ``{"$float": "nan" | "inf" | "-inf"}`` so no value is lost and no
non-standard token appears. Tuples become lists; mapping keys must be strings.

**Tensor digest** (an update's or a model's parameters): SHA-256 over, for each tensor name in
sorted order (Python ``sorted`` on the ``str`` names, i.e. by code point), a header line
``canonical_json([name, dtype, shape, nbytes]) + b"\\n"`` followed by the tensor's ``nbytes`` raw
bytes, row-major (C-contiguous), little-endian, taken on the CPU. ``dtype`` is torch's name without
the ``torch.`` prefix (``"float32"``, ``"bfloat16"``, ``"int64"``, ``"bool"``), ``shape`` a list of
ints (``[]`` for a scalar). The header frames the bytes, so no two different sets of tensors share
an encoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

FLOAT_TAG = "$float"


class EncodingError(ValueError):
    """A value that has no canonical encoding (a non-string key, an unknown type)."""


def jsonable(obj: Any, *, where: str = "body") -> Any:
    """``obj`` as plain JSON types, with non-finite floats tagged (see the module docstring)."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {FLOAT_TAG: "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise EncodingError(f"{where}: key {k!r} is not a string")
            out[k] = jsonable(v, where=f"{where}.{k}")
        return out
    if isinstance(obj, list | tuple):
        return [jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item(), where=where)
    raise EncodingError(f"{where}: {type(obj).__name__} has no canonical JSON encoding")


def canonical_json(obj: Any) -> bytes:
    """The canonical UTF-8 JSON bytes of ``obj`` (after :func:`jsonable`)."""
    return json.dumps(
        jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def is_canonical(text: bytes) -> bool:
    """Whether ``text`` is exactly the canonical encoding of what it decodes to."""
    try:
        return canonical_json(json.loads(text)) == text
    except (ValueError, EncodingError):
        return False


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    raw = flat.view(torch.uint8).numpy().tobytes()
    if sys.byteorder != "little" and flat.element_size() > 1:  # pragma: no cover - LE hosts
        size = flat.element_size()
        raw = b"".join(raw[i : i + size][::-1] for i in range(0, len(raw), size))
    return raw


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the canonical byte encoding of named tensors (module docstring)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        data = _tensor_bytes(t)
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(canonical_json([name, dtype, list(t.shape), len(data)]) + b"\n")
        h.update(data)
    return h.hexdigest()


def file_digest(path: Any) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
