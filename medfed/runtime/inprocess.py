"""In-process runtime: sites are direct calls on one reused worker model.

This is the simulator: it carries tasks to sites and updates back without serialising anything,
so the engine's overhead over a plain PyTorch loop stays small. Site-local state (FedBN's BN,
SCAFFOLD's c_i) is held here per site, as a real site would hold it on its own disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from medfed.algorithms.base import Algorithm, LocalResult, LocalTask
from medfed.audit.site import Receipt, SiteLedger
from medfed.client.train import TrainOptions
from medfed.config import FaultConfig, FaultKind, VectorizeMode
from medfed.data.site import ArrayDataset
from medfed.runtime.vectorized import VectorizedClients, static_reason
from medfed.seeding import derive_seed, torch_generator
from medfed.types import Buffers, ClientState, ParamKind, Params, Task, Update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A site that produced no usable update this round (raised, dropped out)."""

    site: str
    reason: str


Outcome = Update | Failure
SiteCallback = Callable[[str], None]


class InjectedFault(RuntimeError):
    pass


class VectorizeError(ValueError):
    """``runtime.vectorize: on`` with a setup the vectorised path does not reproduce."""


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
    opts = opts.at_round(task.round_idx)
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


class _OnDevice(Mapping[str, ArrayDataset]):
    """Site data copied to ``device`` when a site first takes part, then kept there: device
    memory grows with the sites that trained, not with the sites that are registered."""

    def __init__(self, data: Mapping[str, ArrayDataset], device: torch.device) -> None:
        self._host, self._device = data, device
        self._moved: dict[str, ArrayDataset] = {}

    def __getitem__(self, site: str) -> ArrayDataset:
        if site not in self._moved:
            self._moved[site] = self._host[site].to(self._device)
        return self._moved[site]

    def __iter__(self) -> Iterator[str]:
        return iter(self._host)

    def __len__(self) -> int:
        return len(self._host)


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
        vectorize: VectorizeMode = VectorizeMode.OFF,
        vector_min_clients: int = 8,
        vector_chunk: int = 256,
    ) -> None:
        self.model = model.to(device)
        self.task = task
        self.algorithm = algorithm
        self.device = device
        # GPU-resident data when on a GPU: one host->device copy per site and run, not per round.
        self.data = _OnDevice(data, device) if device.type == "cuda" else data
        self.opts = opts
        self.seed = seed
        self.faults = {f.site: f for f in faults}
        unknown = sorted(set(self.faults) - set(data))
        if unknown:
            raise ValueError(f"faults name unknown sites {unknown}; sites: {sorted(data)}")
        # Only sites that keep something have an entry: 1,000 registered FedAvg sites hold nothing.
        self.client_states: dict[str, ClientState] = {}
        # Simulated sites' ledger halves (medfed.audit): each signs what it sends, per round.
        self.site_ledgers: dict[str, SiteLedger] = {}
        self.receipts: dict[str, Receipt] = {}
        self.vectorize = vectorize
        self.vector_min_clients = 1 if vectorize is VectorizeMode.ON else vector_min_clients
        self._vector: VectorizedClients | None = None
        self._vector_off = ""
        self._noted: set[str] = set()
        if vectorize is not VectorizeMode.OFF:
            reason = static_reason(self.model, algorithm, opts, task=task, device=device)
            if reason is None:
                self._vector = VectorizedClients(
                    self.model,
                    algorithm,
                    opts,
                    device=device,
                    seed=seed,
                    min_clients=self.vector_min_clients,
                    chunk=vector_chunk,
                )
            else:
                self._no_vectors(reason)

    def _no_vectors(self, reason: str) -> None:
        if self.vectorize is VectorizeMode.ON:
            raise VectorizeError(f"runtime.vectorize is on, but {reason}")
        self._vector, self._vector_off = None, reason

    def _note(self, reason: str) -> None:
        """Say once per run why client rounds that could be batched train one by one."""
        if reason not in self._noted:
            self._noted.add(reason)
            log.warning("sequential client training: %s", reason)

    def _keep(self, site: str, state: ClientState) -> None:
        if state:
            self.client_states[site] = state
        else:
            self.client_states.pop(site, None)

    def _execute_vectorized(
        self,
        participants: Sequence[str],
        tasks: Mapping[str, LocalTask],
        on_site: SiteCallback | None,
    ) -> dict[str, Outcome]:
        """The outcomes of the sites trained as one batched computation; the rest go on to the
        sequential loop (faulty sites, small groups, DP-SGD, a group whose batch failed)."""
        if self.vectorize is VectorizeMode.OFF or len(participants) < self.vector_min_clients:
            return {}
        if self._vector is None:
            self._note(self._vector_off)
            return {}
        round_idx = tasks[participants[0]].round_idx
        sites = [s for s in participants if self._fault(s, round_idx) is None]
        if len(sites) < len(participants):
            self._note("injected faults run on the sequential path")
        if not sites:
            return {}
        reason = self._vector.probe(tasks[sites[0]].global_params, self.data[sites[0]])
        if reason is not None:
            self._no_vectors(reason)
            self._note(reason)
            return {}
        split = self._vector.split([tasks[s] for s in sites], [self.data[s] for s in sites])
        if split.sequential:
            self._note("sites of a step count shared by too few sites train sequentially")
        out: dict[str, Outcome] = {
            site: Failure(site, f"client raised {type(err).__name__}: {err}")
            for site, err in split.failures.items()
        }
        for group in split.groups:
            if on_site is not None:
                for job in group:
                    on_site(job.task.site)
            try:
                results = self._vector.train(group)
            except Exception as err:  # the group's sites then train one by one
                self._note(f"a vectorised group failed ({type(err).__name__}: {err})")
                continue
            for job, result in zip(group, results, strict=True):
                self._keep(job.task.site, result.client_state)
                out[job.task.site] = result.update
        if participants[-1] in out:
            self._vector.reseed(tasks[participants[-1]])
        return out

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
        tasks = {
            site: LocalTask(
                site=site,
                round_idx=round_idx,
                global_params=global_params,
                payload=payload,
                client_state=self.client_states.get(site, {}),
                kind=self.task,
            )
            for site in participants
        }
        batched = self._execute_vectorized(participants, tasks, on_site)
        outcomes: list[Outcome] = []
        for site in participants:
            if site in batched:
                outcomes.append(batched[site])
                continue
            if on_site is not None:
                on_site(site)
            task = tasks[site]
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
            self._keep(site, result.client_state)
            update = result.update
            if fault is not None:
                update = apply_fault(update, fault, global_params)
            outcomes.append(update)
        self.receipts = {  # each site signs exactly what it sends (medfed.audit.site)
            o.site: self.site_ledgers[o.site].sign_update(round_idx, o)
            for o in outcomes
            if isinstance(o, Update) and o.site in self.site_ledgers
        }
        return outcomes
