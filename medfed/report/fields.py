"""Typed access to the fields of ``results.json``: every failure names the file and the field.

``where`` is the dotted path of the enclosing object (``"UNet.federated.internal"``), so an error
reads ``results.json: missing field 'UNet.federated.internal.dice_ci'`` rather than a ``KeyError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

RESULTS = "results.json"

CI = tuple[float | None, float | None]


def fail(file: str, field: str, problem: str = "missing field") -> ValueError:
    return ValueError(f"{file}: {problem} '{field}'")


def get(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise fail(RESULTS, f"{where}.{key}" if where else key)
    return obj[key]


def num(obj: Any, key: str, where: str) -> float | None:
    """A number or ``None``; NaN (allowed in the writer's JSON) is as undefined as null."""
    v = get(obj, key, where)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise fail(RESULTS, f"{where}.{key}", "not a number:")
    return None if math.isnan(v) else float(v)


def count(obj: Any, key: str, where: str) -> int:
    v = num(obj, key, where)
    if v is None:
        raise fail(RESULTS, f"{where}.{key}", "null where a count is needed:")
    return int(v)


def text(obj: Any, key: str, where: str) -> str:
    v = get(obj, key, where)
    if not isinstance(v, str):
        raise fail(RESULTS, f"{where}.{key}", "not a string:")
    return v


def texts(obj: Any, key: str, where: str) -> tuple[str, ...]:
    v = get(obj, key, where)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise fail(RESULTS, f"{where}.{key}", "not a list of strings:")
    return tuple(v)


def interval(obj: Any, key: str, where: str) -> CI | None:
    v = get(obj, key, where)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 2:
        raise fail(RESULTS, f"{where}.{key}", "not a [low, high] pair:")
    pair = {"lo": v[0], "hi": v[1]}
    return (num(pair, "lo", f"{where}.{key}"), num(pair, "hi", f"{where}.{key}"))
