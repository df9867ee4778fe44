"""Server-side checks on every update before it can touch the global model.

A hospital's client can be buggy, misconfigured or compromised; one NaN or a mis-shaped tensor
must cost that site its round, not the federation its model. Each check returns a reason naming the
tensor, so the site's operator can find the fault.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch

from medfed.types import ParamKind, Params, Update


def _check_tensors(
    what: str,
    tensors: Mapping[str, torch.Tensor],
    reference: Params,
    *,
    exact_keys: Collection[str],
) -> str | None:
    missing = sorted(set(exact_keys) - set(tensors))
    if missing:
        return f"{what}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}"
    extra = sorted(set(tensors) - set(exact_keys))
    if extra:
        return f"{what}: unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''}"
    floats: list[str] = []
    for key in sorted(exact_keys):
        t, ref = tensors[key], reference[key]
        if not isinstance(t, torch.Tensor):
            return f"{what}: {key!r} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(ref.shape):
            return f"{what}: {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{what}: {key!r} has dtype {t.dtype}, expected {ref.dtype}"
        if t.is_floating_point():
            floats.append(key)
    if floats:
        # All non-finite counts in one device->host transfer, not one sync per tensor.
        device = tensors[floats[0]].device
        counts = torch.stack(
            [(~torch.isfinite(tensors[k])).sum().to(device) for k in floats]
        ).tolist()
        for key, bad in zip(floats, counts, strict=True):
            if bad:
                return f"{what}: {key!r} has {bad} non-finite (NaN/Inf) values"
    return None


def validate_update(
    update: Update,
    global_params: Params,
    *,
    expected_keys: Collection[str] | None,
    max_relative_norm: float,
) -> str | None:
    """Return why ``update`` must be rejected, or None if it is acceptable."""
    if update.num_examples <= 0:
        return f"num_examples must be positive, got {update.num_examples}"
    keys = set(global_params) if expected_keys is None else set(expected_keys)
    reason = _check_tensors("params", update.params, global_params, exact_keys=keys)
    if reason:
        return reason
    for group, tensors in update.extras.items():
        reason = _check_tensors(f"extras[{group!r}]", tensors, global_params, exact_keys=tensors)
        if reason:
            return reason
    for name, value in update.metrics.items():
        if not math.isfinite(float(value)):
            return f"metric {name!r} is not finite ({value})"
    delta_parts, ref_parts = [], []
    for key in sorted(keys):
        ref = global_params[key]
        if not ref.is_floating_point():
            continue
        t = update.params[key].double().to(ref.device)
        d = t if update.kind is ParamKind.DELTA else t - ref.double()
        delta_parts.append(d.pow(2).sum())
        ref_parts.append(ref.double().pow(2).sum())
    if not delta_parts:
        return None
    # Summed on the device; one transfer for both norms.
    delta_sq, ref_sq = torch.stack(
        [torch.stack(delta_parts).sum(), torch.stack(ref_parts).sum()]
    ).tolist()
    delta_norm, ref_norm = math.sqrt(delta_sq), math.sqrt(ref_sq)
    if delta_norm > max_relative_norm * max(ref_norm, 1e-12):
        return (
            f"update norm {delta_norm:.3g} exceeds {max_relative_norm:g} x the global model's "
            f"norm {ref_norm:.3g}"
        )
    return None
