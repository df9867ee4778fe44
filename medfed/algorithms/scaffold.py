"""SCAFFOLD (Karimireddy et al. 2020) with option-II control variates.

Non-IID sites drift towards their own optima during local steps; SCAFFOLD corrects every local
gradient by (c - c_i), the difference between the server's estimate of the global gradient and
this site's own, so local steps follow the global direction.

* Server state ``c`` (``StrategyState.buffers["c"]``, zeros at init), sent as ``payload``.
* Site state ``c_i`` (``ClientState["c_i"]``, zeros on a site's first round), never sent.
* Client: start at x, K local steps ``y <- y - η_l·(g(y) + c - c_i)`` (``grad_hook``), then
  ``c_i⁺ = c_i - c + (x - y)/(K·η_l)``; upload y and ``extras["delta_c"] = c_i⁺ - c_i``.
* Server: ``x <- x + η_g·avg_i(y_i - x)``, ``c <- c + (|S|/N)·mean_i(Δc_i)`` with N the number of
  sites in the federation (so c stays the mean of *all* c_i, sampled or not).

Choices:

* Plain SGD without momentum. Option II's ``(x - y)/(K·η_l)`` is the average corrected
  gradient only when each step moves by exactly η_l times it. With heavy-ball momentum β every
  gradient is applied ~1/(1-β) times (10× at β = 0.9), so c_i would be inflated by up to that
  factor and the correction would overshoot and destabilise training. The client therefore trains
  with ``momentum = 0`` whatever ``TrainOptions.momentum`` says (recorded in the update's metrics
  as ``momentum_overridden``); Adam/AdamW are rejected since their steps are not η_l·g at all.
  Weight decay is kept: it is part of the gradient of the regularised local objective.
* K is the number of optimizer steps actually taken (``TrainResult.num_steps``), η_l is
  ``TrainOptions.lr``.
* Only trainable floating-point parameters have control variates. Buffers (BatchNorm running
  statistics, counters) have no gradient; they take the plain weighted mean.
* ``avg_i(y_i - x)`` is weighted by ``num_examples`` by default (``weighting="num_examples"``),
  so that SCAFFOLD with c = 0 and η_g = 1 is exactly FedAvg; ``"uniform"`` gives the paper's
  unweighted mean. The c update is always uniform because c is defined as the mean of the c_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

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
    LocalResult,
    LocalTask,
    NotVectorizable,
    VectorStep,
    check_context,
    load_params,
    read_params,
    trainable_keys,
)
from medfed.algorithms.registry import STRATEGIES
from medfed.client.train import TrainOptions, TrainResult, train_local
from medfed.data.site import ArrayDataset
from medfed.types import Buffers, ClientState, ParamKind, Params, StrategyState, StrEnum, Update

SERVER_CONTROL = "c"  # StrategyState.buffers group and payload group
CLIENT_CONTROL = "c_i"  # ClientState group
DELTA_CONTROL = "delta_c"  # Update.extras group


class Weighting(StrEnum):
    NUM_EXAMPLES = "num_examples"
    UNIFORM = "uniform"


class ScaffoldOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server_lr: float = Field(1.0, gt=0, description="η_g, the global step size")
    weighting: Weighting = Weighting.NUM_EXAMPLES


def control_keys(model: nn.Module) -> list[str]:
    """Trainable floating-point parameters, in ``state_dict`` order."""
    trainable = trainable_keys(model)
    return [k for k, v in model.state_dict().items() if k in trainable and v.is_floating_point()]


class Scaffold(AlgorithmBase):
    name = "scaffold"

    def __init__(self, options: ScaffoldOptions | None = None) -> None:
        self.options = options or ScaffoldOptions()
        # An averaging rule only when the server applies the mean delta unscaled.
        self.preserves_consensus = self.options.server_lr == 1.0
        self._num_sites: int | None = None
        self._control_keys: tuple[str, ...] = ()

    # --- server half ---

    def init(self, global_params: Params, *, context: FederationContext) -> StrategyState:
        check_context(global_params, context)
        self._num_sites = len(context.sites)
        self._control_keys = tuple(control_keys(context.model))
        c = {
            k: torch.zeros_like(global_params[k], dtype=state_dtype(global_params[k].dtype))
            for k in self._control_keys
        }
        return StrategyState(round=0, buffers={SERVER_CONTROL: c})

    def payload(self, state: StrategyState) -> Buffers:
        return {SERVER_CONTROL: state.buffers[SERVER_CONTROL]}

    def aggregate(
        self,
        global_params: Params,
        updates: Sequence[Update],
        state: StrategyState,
        *,
        round_idx: int,
    ) -> tuple[Params, StrategyState]:
        if self._num_sites is None:
            raise RuntimeError("scaffold: call init() before aggregate()")
        ups = prepare_updates(global_params, updates, self.uploaded_keys())
        if len(ups) > self._num_sites:
            raise ValueError(f"{len(ups)} updates but only {self._num_sites} sites")
        c_old = state.buffers[SERVER_CONTROL]
        ckeys = set(c_old)
        for u in ups:
            dc = u.extras.get(DELTA_CONTROL)
            if dc is None or set(dc) != ckeys:
                raise ValueError(
                    f"scaffold: update from {u.site!r} lacks a complete {DELTA_CONTROL!r}"
                )

        weights = (
            [float(u.num_examples) for u in ups]
            if self.options.weighting == Weighting.NUM_EXAMPLES
            else [1.0] * len(ups)
        )
        mean = _weighted_mean64([as_weights(u, global_params) for u in ups], weights)
        lr_g = self.options.server_lr
        new: Params = {}
        for k, avg in mean.items():
            if k in ckeys:
                x = to_compute(global_params[k])
                new[k] = cast_like(x + lr_g * (avg.to(x.device) - x), global_params[k])
            else:  # buffers: plain weighted mean
                new[k] = cast_like(avg, global_params[k])

        mean_dc = _weighted_mean64([dict(u.extras[DELTA_CONTROL]) for u in ups], [1.0] * len(ups))
        frac = len(ups) / self._num_sites
        c_new = {
            k: cast_like(to_compute(c_old[k]) + frac * mean_dc[k].to(c_old[k].device), c_old[k])
            for k in c_old
        }
        return merge(global_params, new), StrategyState(
            round=state.round + 1, buffers={SERVER_CONTROL: c_new}, scalars=dict(state.scalars)
        )

    # --- client half ---

    def local_update(
        self,
        model: nn.Module,
        task: LocalTask,
        data: ArrayDataset,
        opts: TrainOptions,
        *,
        generator: torch.Generator,
        device: torch.device,
    ) -> LocalResult:
        check_optimizer(opts)
        keys = control_keys(model)
        c, c_i = site_controls(task)
        if set(c) != set(keys):
            raise ValueError("scaffold: server control variate keys do not match the model")

        load_params(model, task.global_params, device)
        named = dict(model.named_parameters(remove_duplicate=False))
        corrections = [(named[k], correction(c, c_i, k).to(device, named[k].dtype)) for k in keys]

        def correct(_: nn.Module) -> None:
            for p, d in corrections:
                if p.grad is None:  # unused in this forward: the corrected gradient is just d
                    p.grad = d.clone()
                else:
                    p.grad.add_(d)

        result = train_local(
            model,
            data,
            plain_sgd(opts),
            generator=generator,
            device=device,
            grad_hook=correct,
            task=task.kind,
            dp=task.sample_dp,
        )
        return control_result(task, read_params(model), result, opts)

    def vector_step(self, opts: TrainOptions) -> VectorStep:
        try:
            check_optimizer(opts)
        except ValueError as err:
            raise NotVectorizable(str(err)) from None

        def admit(task: LocalTask, data: ArrayDataset) -> LocalTask:
            site_controls(task)  # the same refusals as the sequential client half
            return task

        def aux(task: LocalTask, device: torch.device) -> Params:
            c, c_i = site_controls(task)
            dtypes = task.global_params
            return {k: correction(c, c_i, k).to(device, dtypes[k].dtype) for k in c}

        def grad_term(grads: Params, corrections: Params) -> Params:
            return {k: g + corrections[k] if k in corrections else g for k, g in grads.items()}

        def finish(
            task: LocalTask,
            trained: LocalTask,
            params: Params,
            result: TrainResult,
            _: torch.Generator,
        ) -> LocalResult:
            return control_result(trained, params, result, opts)

        return VectorStep(
            options=plain_sgd(opts), finish=finish, admit=admit, aux=aux, grad_term=grad_term
        )

    def personalize(self, global_params: Params, client_state: ClientState) -> Params:
        return global_params


STRATEGIES.register("scaffold", options=ScaffoldOptions)(Scaffold)


# --- the client half's pieces, shared by the sequential and the vectorised runtime ---


def check_optimizer(opts: TrainOptions) -> None:
    if opts.optimizer != "sgd":
        raise ValueError(f"scaffold needs plain SGD local steps, got optimizer={opts.optimizer!r}")


def plain_sgd(opts: TrainOptions) -> TrainOptions:
    """The local options SCAFFOLD trains with: momentum off (see the module docstring)."""
    return opts.model_copy(update={"momentum": 0.0}) if opts.momentum else opts


def site_controls(task: LocalTask) -> tuple[Params, Params]:
    """(c, c_i) for this site's round; c_i is zeros on the site's first round."""
    c = task.payload.get(SERVER_CONTROL)
    if c is None:
        raise ValueError("scaffold: the task carries no server control variate 'c'")
    c_i = task.client_state.get(CLIENT_CONTROL) or {k: torch.zeros_like(v) for k, v in c.items()}
    return dict(c), dict(c_i)


def correction(c: Params, c_i: Params, key: str) -> torch.Tensor:
    """The drift correction c - c_i added to the gradient of ``key`` at every local step."""
    return to_compute(c[key]) - to_compute(c_i[key])


def control_result(
    task: LocalTask, y: Params, result: TrainResult, opts: TrainOptions
) -> LocalResult:
    """Option II: ``c_i+ = c_i - c + (x - y)/(K·η_l)``; upload y and ``delta_c = c_i+ - c_i``."""
    c, c_i = site_controls(task)
    x = task.global_params
    steps, lr = result.num_steps, opts.lr
    c_i_new: Params = {}
    delta_c: Params = {}
    for k in c:
        ci = to_compute(c_i[k]).cpu()
        if steps > 0:
            drift = (to_compute(x[k]).cpu() - to_compute(y[k]).cpu()) / (steps * lr)
            new = ci - to_compute(c[k]).cpu() + drift
        else:
            new = ci
        c_i_new[k] = cast_like(new, c[k]).cpu()
        # In the stored dtype, so the server's c tracks exactly the sum of the stored c_i.
        delta_c[k] = c_i_new[k] - c_i[k].to(c_i_new[k].dtype).cpu()

    update = Update(
        site=task.site,
        params=y,
        kind=ParamKind.WEIGHTS,
        num_examples=result.num_examples,
        metrics={
            "train_loss": result.loss,
            "steps": float(steps),
            "momentum_overridden": float(opts.momentum != 0),
        },
        extras={DELTA_CONTROL: delta_c},
    )
    return LocalResult(update, client_state={CLIENT_CONTROL: c_i_new})
