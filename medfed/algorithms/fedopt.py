"""Adaptive federated optimization (Reddi et al. 2021): FedAdam, FedYogi, FedAdagrad.

The server treats the negative of the example-weighted mean delta as a pseudo-gradient and takes
an adaptive optimizer step with it. Clients train plainly (FedAvg's client half).

With Δ_t = mean_i(y_i) - x_t, the rules -- written to reproduce Flower's
``flwr.server.strategy.FedAdam / FedYogi / FedAdagrad`` exactly, so a test compares to them:

    m_t = β1·m_{t-1} + (1 - β1)·Δ_t                                   (all three; m_0 = 0)
    Adam:    v_t = β2·v_{t-1} + (1 - β2)·Δ_t²                          (v_0 = 0)
             η_t = η·sqrt(1 - β2^(t+1)) / (1 - β1^(t+1))               bias correction as Flower
    Yogi:    v_t = v_{t-1} - (1 - β2)·Δ_t²·sign(v_{t-1} - Δ_t²)        (v_0 = 0), η_t = η
    Adagrad: v_t = v_{t-1} + Δ_t²                                      (v_0 = 0), η_t = η
    x_{t+1} = x_t + η_t·m_t / (sqrt(v_t) + τ)

Notes on matching Flower:

* ``t`` is the 1-based index of this server step (Flower's ``server_round``); it is kept in
  ``StrategyState.round`` (number of steps taken), so ``t = state.round + 1``. Flower's Adam bias
  correction uses the exponent ``t + 1`` (not Kingma & Ba's ``t``); we keep that for parity.
* Flower starts v at 0 (the paper suggests v_0 = τ²); so do we.
* Flower's FedAdagrad has no momentum (β1 = 0); here β1 is an option defaulting to 0.
* Defaults of η, β1, β2, τ are Flower's for each strategy.

Only *trainable floating-point parameters* get the optimizer. Buffers -- BatchNorm running
mean/var and the integer ``num_batches_tracked`` -- take the plain example-weighted mean: they are
statistics, not descent directions; an adaptive step (which for small Δ moves each coordinate by
about η regardless of Δ's size) could push a running variance negative, and an integer counter
cannot follow a fractional step at all.

``preserves_consensus`` is False: even when every client returns the same W, the server moves by
η_t·m_t/(sqrt(v_t)+τ) -- roughly η·sign(Δ) per coordinate, not Δ -- so it lands on W only by chance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from medfed.algorithms.aggregate import (
    _weighted_mean64,
    as_weights,
    cast_like,
    merge,
    prepare_updates,
    state_dtype,
    to_compute,
)
from medfed.algorithms.base import (
    AlgorithmBase,
    FederationContext,
    check_context,
    trainable_keys,
)
from medfed.algorithms.registry import STRATEGIES
from medfed.types import Params, StrategyState, StrEnum, Update


class ServerOptimizer(StrEnum):
    ADAM = "fedadam"
    YOGI = "fedyogi"
    ADAGRAD = "fedadagrad"


class Moment(StrEnum):
    """Names of the ``StrategyState.buffers`` groups (also the checkpoint's tensor prefixes)."""

    M = "m"
    V = "v"


class FedAdamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    eta: float = Field(1e-1, gt=0, description="server learning rate")
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-9, gt=0, description="adaptivity; larger = closer to momentum SGD")


class FedYogiOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    eta: float = Field(1e-2, gt=0)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class FedAdagradOptions(BaseModel):
    """No beta_2: Adagrad accumulates squared deltas without decay."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eta: float = Field(1e-1, gt=0)
    beta_1: float = Field(0.0, ge=0, lt=1)
    tau: float = Field(1e-9, gt=0)


FedOptOptions = FedAdamOptions | FedYogiOptions | FedAdagradOptions


class FedOpt(AlgorithmBase):
    preserves_consensus = False

    def __init__(self, rule: ServerOptimizer, options: FedOptOptions) -> None:
        self.rule = rule
        self.name = str(rule)
        self.options = options
        self._opt_keys: tuple[str, ...] | None = None

    # --- server half ---

    def init(self, global_params: Params, *, context: FederationContext) -> StrategyState:
        check_context(global_params, context)
        trainable = trainable_keys(context.model)
        self._opt_keys = tuple(
            k for k in global_params if k in trainable and global_params[k].dtype.is_floating_point
        )
        zeros = {
            k: torch.zeros_like(global_params[k], dtype=state_dtype(global_params[k].dtype))
            for k in self._opt_keys
        }
        moments = {Moment.M.value: zeros, Moment.V.value: {k: z.clone() for k, z in zeros.items()}}
        return StrategyState(round=0, buffers=moments)

    def _lr(self, t: int) -> float:
        o = self.options
        if self.rule == ServerOptimizer.ADAM:
            assert isinstance(o, FedAdamOptions)
            return o.eta * math.sqrt(1 - o.beta_2 ** (t + 1)) / (1 - o.beta_1 ** (t + 1))
        return o.eta

    def _second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        d2 = d * d
        if self.rule == ServerOptimizer.ADAM:
            b2 = self.options.beta_2  # type: ignore[union-attr]
            return b2 * v + (1 - b2) * d2
        if self.rule == ServerOptimizer.YOGI:
            b2 = self.options.beta_2  # type: ignore[union-attr]
            return v - (1 - b2) * d2 * torch.sign(v - d2)
        return v + d2

    def aggregate(
        self,
        global_params: Params,
        updates: Sequence[Update],
        state: StrategyState,
        *,
        round_idx: int,
    ) -> tuple[Params, StrategyState]:
        if self._opt_keys is None:
            raise RuntimeError(f"{self.name}: call init() before aggregate()")
        ups = prepare_updates(global_params, updates, self.uploaded_keys())
        mean = _weighted_mean64(
            [as_weights(u, global_params) for u in ups], [u.num_examples for u in ups]
        )
        # Buffers (and frozen params): plain weighted mean.
        new = {k: cast_like(v, global_params[k]) for k, v in mean.items()}
        t = state.round + 1
        lr = self._lr(t)
        b1 = self.options.beta_1
        m_old, v_old = state.buffers[Moment.M], state.buffers[Moment.V]
        m_new: Params = {}
        v_new: Params = {}
        for k in self._opt_keys:
            x = to_compute(global_params[k])
            delta = mean[k].to(x.device) - x
            m = b1 * to_compute(m_old[k]).to(x.device) + (1 - b1) * delta
            v = self._second_moment(to_compute(v_old[k]).to(x.device), delta)
            new[k] = cast_like(x + lr * m / (torch.sqrt(v) + self.options.tau), global_params[k])
            m_new[k] = cast_like(m, m_old[k])
            v_new[k] = cast_like(v, v_old[k])
        buffers = {Moment.M.value: m_new, Moment.V.value: v_new}
        return merge(global_params, new), StrategyState(
            round=t, buffers=buffers, scalars=dict(state.scalars)
        )


@STRATEGIES.register(ServerOptimizer.ADAM.value, options=FedAdamOptions)
def _fedadam(options: FedAdamOptions) -> FedOpt:
    return FedOpt(ServerOptimizer.ADAM, options)


@STRATEGIES.register(ServerOptimizer.YOGI.value, options=FedYogiOptions)
def _fedyogi(options: FedYogiOptions) -> FedOpt:
    return FedOpt(ServerOptimizer.YOGI, options)


@STRATEGIES.register(ServerOptimizer.ADAGRAD.value, options=FedAdagradOptions)
def _fedadagrad(options: FedAdagradOptions) -> FedOpt:
    return FedOpt(ServerOptimizer.ADAGRAD, options)
