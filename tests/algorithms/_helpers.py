"""Shared fixtures-as-functions for the algorithm tests: tiny models, params, updates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medfed.algorithms import Algorithm, FederationContext
from medfed.algorithms.scaffold import DELTA_CONTROL
from medfed.data.site import ArrayDataset
from medfed.types import ParamKind, Params, Update

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """Linear -> BatchNorm1d -> Linear: trainable params, float buffers and an int64 counter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class TinyCNN(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> pool -> Linear, for 1x8x8 images and 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


TINY_CNN_BN_KEYS = frozenset(
    {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def tiny_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


def tiny_dataset(n: int = 16, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    return ArrayDataset(images=images, labels=labels)


def context_for(model: nn.Module, n_sites: int = 8) -> FederationContext:
    return FederationContext(model=model, sites=tuple(f"site{i}" for i in range(n_sites)))


def global_of(model: nn.Module, seed: int = 1) -> Params:
    """The model's state with every tensor perturbed, so BN buffers are not trivial 0/1."""
    g = torch.Generator().manual_seed(seed)
    out: Params = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=g, dtype=torch.float64)
            out[k] = (
                (v.double() + 0.1 * noise).abs().to(v.dtype)
                if "var" in k
                else (v.double() + 0.1 * noise).to(v.dtype)
            )
        else:
            out[k] = torch.randint(0, 50, v.shape, generator=g, dtype=v.dtype)
    return out


def expected_keys(algo: Algorithm, global_params: Params) -> list[str]:
    keys = algo.uploaded_keys()
    return [k for k in global_params if keys is None or k in keys]


def random_params_like(
    global_params: Params,
    keys: Sequence[str],
    g: torch.Generator,
    scale: float = 0.3,
    *,
    quantized: bool = False,
) -> Params:
    """Global + noise; ``quantized`` draws the noise from {-scale, 0, scale} to provoke ties."""
    out: Params = {}
    for k in keys:
        v = global_params[k]
        if v.is_floating_point():
            d = torch.randn(v.shape, generator=g, dtype=torch.float64) * scale
            if quantized:
                d = torch.randint(-1, 2, v.shape, generator=g).double() * scale
            out[k] = (v.double() + d).to(v.dtype)
        else:
            out[k] = v + torch.randint(0, 5, v.shape, generator=g, dtype=v.dtype)
    return out


def control_delta(global_params: Params, model: nn.Module, g: torch.Generator) -> Params:
    """A random SCAFFOLD ``delta_c`` over trainable float params (ignored by other strategies)."""
    from medfed.algorithms.scaffold import control_keys

    return {
        k: (torch.randn(global_params[k].shape, generator=g, dtype=torch.float64) * 0.01).to(
            torch.promote_types(global_params[k].dtype, torch.float32)
        )
        for k in control_keys(model)
    }


def make_update(
    site: str,
    params: Params,
    num_examples: int,
    *,
    global_params: Params,
    kind: ParamKind = ParamKind.WEIGHTS,
    delta_c: Params | None = None,
) -> Update:
    if kind == ParamKind.DELTA:
        # float64 deltas: the difference of two float32 values is exact there.
        params = {k: v.double() - global_params[k].double() for k, v in params.items()}
    return Update(
        site=site,
        params=params,
        kind=kind,
        num_examples=num_examples,
        extras={DELTA_CONTROL: delta_c} if delta_c is not None else {},
    )


def to_numpy_list(params: Params, keys: Sequence[str]) -> list[np.ndarray]:
    return [params[k].detach().cpu().numpy() for k in keys]


def assert_params_equal(a: Params, b: Params) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
