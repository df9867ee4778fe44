"""The array layout both SecAgg+ halves share: medfed ``Params`` <-> Flower's NDArrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.common import NDArrays

from medfed.types import Params

_EXTRAS = 2  # the last array: [train_loss, clipped flag], averaged securely like the weights


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host array numpy can hold (bfloat16 widens to float32; it is cast back on arrival)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def params_to_ndarrays(params: Params, keys: Sequence[str]) -> NDArrays:
    return [to_numpy(params[k]) for k in keys]


def ndarrays_to_params(arrays: NDArrays, like: Params) -> Params:
    if len(arrays) != len(like):
        raise ValueError(f"{len(arrays)} arrays for a model with {len(like)} tensors")
    out = {}
    for (k, ref), a in zip(like.items(), arrays, strict=True):
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"{k!r}: shape {tuple(a.shape)} != {tuple(ref.shape)}")
        # np.array, not ascontiguousarray: that one turns a 0-d array (a scalar buffer) 1-d
        out[k] = torch.from_numpy(np.array(a, copy=True)).reshape(ref.shape).to(ref.dtype)
    return out
