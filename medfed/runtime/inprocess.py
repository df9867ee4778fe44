"""In-process runtime: sites are direct calls on one reused worker model.

This is the simulator: it carries tasks to sites and updates back without serialising anything,
so the engine's overhead over a plain PyTorch loop stays small. Site-local state (FedBN's BN,
SCAFFOLD's c_i) is held here per site, as a real site would hold it on its own disk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from medfed.algorithms.base import Algorithm, LocalResult, LocalTask
from medfed.client.train import TrainOptions
from medfed.config import FaultConfig, FaultKind
from medfed.data.site import ArrayDataset
from medfed.seeding import derive_seed, torch_generator
from medfed.types import Buffers, ClientState, ParamKind, Params, Task, Update


@dataclass(frozen=True)
class Failure:
    """A site that produced no usable update this round (raised, dropped out)."""

    site: str
    reason: str


Outcome = Update | Failure
SiteCallback = Callable[[str], None]


class InjectedFault(RuntimeError):
    pass


def fault_for(faults: Sequence[FaultConfig], site: str, round_idx: int) -> FaultConfig | None:
    """The configured misbehaviour of ``site`` in this round, if any (for robustness tests)."""
    for f in faults:
        if f.site == site and (f.rounds is None or round_idx in f.rounds):
            return f
    return None


def apply_fault(update: Update, fault: FaultConfig, global_params: Params) -> Update:
    params = dict(update.params)
    if fault.kind is FaultKind.NAN:
        key = next(k for k, v in params.items() if v.is_floating_point())
        bad = params[key].clone()
        bad.view(-1)[0] = float("nan")
        params[key] = bad
    elif fault.kind is FaultKind.WRONG_SHAPE:
        key = next(k for k, v in params.items() if v.numel() > 1)
        params[key] = params[key].reshape(-1)[:-1].clone()
    elif fault.kind is FaultKind.SCALE:
        params = {
            k: (global_params[k] + fault.factor * (v - global_params[k]))
            if v.is_floating_point() and update.kind is ParamKind.WEIGHTS
            else v * fault.factor
            if v.is_floating_point()
            else v
            for k, v in params.items()
        }
    return replace(update, params=params)


def local_round(
    algorithm: Algorithm,
    model: nn.Module,
    task: LocalTask,
    data: ArrayDataset,
    opts: TrainOptions,
    *,
    device: torch.device,
    seed: int,
) -> LocalResult:
    """One site's local round, exactly as every runtime must run it.

    Randomness derives from (seed, round, site), so a site computes the same update whether the
    simulator or a Flower SuperNode runs it, and whichever sites ran before it.
    """
    torch.manual_seed(derive_seed(seed, "torch", task.round_idx, task.site))
    generator = torch_generator(seed, "train", task.round_idx, task.site)
    return algorithm.local_update(model, task, data, opts, generator=generator, device=device)


def guarded_round(
    algorithm: Algorithm,
    model: nn.Module,
    task: LocalTask,
    data: ArrayDataset,
    opts: TrainOptions,
    *,
    device: torch.device,
    seed: int,
    fault: FaultConfig | None,
) -> LocalResult | Failure:
    """:func:`local_round` as a site runs it inside a federation: a configured dropout or an
    exception costs that site its round (a :class:`Failure` naming why), never the federation."""
    site = task.site
    if fault is not None and fault.kind is FaultKind.DROP:
        return Failure(site, "dropped out: no reply")
    try:
        if fault is not None and fault.kind is FaultKind.RAISE:
            raise InjectedFault(f"injected fault at site {site}")
        return local_round(algorithm, model, task, data, opts, device=device, seed=seed)
    except Exception as err:  # a site's failure must not take the federation down
        return Failure(site, f"client raised {type(err).__name__}: {err}")


class InProcessRuntime:
    def __init__(
        self,
        *,
        model: nn.Module,
        algorithm: Algorithm,
        data: Mapping[str, ArrayDataset],
        opts: TrainOptions,
        device: torch.device,
        seed: int,
        faults: Sequence[FaultConfig] = (),
        task: Task = Task.CLASSIFICATION,
    ) -> None:
        self.model = model.to(device)
        self.task = task
        self.algorithm = algorithm
        self.device = device
        # GPU-resident data when on a GPU: one host->device copy per run, not per round.
        self.data = {k: v.to(device) for k, v in data.items()} if device.type == "cuda" else data
        self.opts = opts
        self.seed = seed
        self.faults = {f.site: f for f in faults}
        unknown = sorted(set(self.faults) - set(data))
        if unknown:
            raise ValueError(f"faults name unknown sites {unknown}; sites: {sorted(data)}")
        self.client_states: dict[str, ClientState] = {}

    def _fault(self, site: str, round_idx: int) -> FaultConfig | None:
        return fault_for(list(self.faults.values()), site, round_idx)

    def execute(
        self,
        round_idx: int,
        participants: Sequence[str],
        global_params: Params,
        payload: Buffers,
        *,
        on_site: SiteCallback | None = None,
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for site in participants:
            if on_site is not None:
                on_site(site)
            task = LocalTask(
                site=site,
                round_idx=round_idx,
                global_params=global_params,
                payload=payload,
                client_state=self.client_states.get(site, {}),
                kind=self.task,
            )
            fault = self._fault(site, round_idx)
            result = guarded_round(
                self.algorithm,
                self.model,
                task,
                self.data[site],
                self.opts,
                device=self.device,
                seed=self.seed,
                fault=fault,
            )
            if isinstance(result, Failure):
                outcomes.append(result)
                continue
            self.client_states[site] = result.client_state
            update = result.update
            if fault is not None:
                update = apply_fault(update, fault, global_params)
            outcomes.append(update)
        return outcomes
