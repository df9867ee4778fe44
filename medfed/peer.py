"""Peer-to-peer training, no aggregator in the loop: cyclic weight transfer and gossip.

``medfed.topologies.cyclic`` / ``.gossip`` decide who trains and who pulls from whom; this module
runs it. Everything else is the star loop's, so the paradigms differ only in topology: training is
``local_round`` with FedAvg's client half (same (seed, round, site) randomness: cyclic over one
site is bit-identical to local-only training), every model a site produces passes
``validate_update`` before a peer takes it (a rejected model is neither passed on nor merged, and
nothing of that step persists), ``faults`` are injected as in the star runtime, and every round is
recorded, checkpointed (per-site models and version vectors as site state) and resumable. With
``ledger.enabled`` every hand-over is a site-signed ledger entry (:mod:`medfed.audit.p2p`), so
``medfed ledger verify RUN_DIR`` checks a peer run as it checks a client-server one.

The run's "global" model is the consensus, the example-weighted average of all sites' current
models (``history.val``, ``external``, ``final.safetensors``); ``site_val`` is each site's *own*
model on its own validation split, and ``extra.peer`` holds each site model on the pooled
validation, their spread and the bytes each site moved. Bytes count transfers between peers only:
gathering the models for the consensus is evaluation, which simulation gets for free.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfed.algorithms.base import LocalTask, load_params, read_params
from medfed.audit.p2p import PeerLedger
from medfed.checkpoint import Checkpoint, load_latest, save_checkpoint, save_params
from medfed.client.train import resolve_device
from medfed.config import RunConfig, config_hash, resume_mismatch
from medfed.data.site import Federation
from medfed.engine import (
    FederationError,
    RunResult,
    _prepare_dir,
    _to_device,
    build_model,
    run_scorer,
)
from medfed.evaluation import Evaluator, Scores, evaluate_external
from medfed.history import History, RoundRecord, SiteRound, run_summary
from medfed.privacy.run import create_algorithm
from medfed.progress import Reporter
from medfed.runtime.inprocess import Failure, apply_fault, fault_for, guarded_round
from medfed.seeding import numpy_rng
from medfed.topologies import cyclic, gossip
from medfed.types import (
    ClientState,
    Paradigm,
    Params,
    StrategyState,
    StrEnum,
    Update,
    params_nbytes,
)
from medfed.validation import validate_update

PEER_PARADIGMS = frozenset({Paradigm.CYCLIC, Paradigm.GOSSIP})
PEER_KEY = "peer"  # RoundRecord.extra and summary.json key of the peer-to-peer data


class Slot(StrEnum):
    """Names of what a peer run checkpoints besides the consensus."""

    MODEL = "model"  # client_states[site][MODEL]: the site's current model
    META = "meta"  # client_states[site][META]: its versions (gossip.state_to_tensors)
    CARRY = "carry"  # strategy buffers[CARRY]: the model travelling around the cycle
    HOLDER = "holder"  # checkpoint meta: the site holding the travelling model


@dataclass(frozen=True)
class Transfer:
    """One model sent from one peer to another."""

    sender: str
    receiver: str


@dataclass(frozen=True)
class GossipStep:
    site: str
    merged: list[str]  # peers pulled and merged at this step
    accepted: bool  # False: the trained model was rejected and the step left no trace


@dataclass(frozen=True)
class PeerRound:
    """``RoundRecord.extra["peer"]``: what a peer-to-peer round adds to the star loop's row."""

    topology: str
    spread: dict[str, float]  # per metric: max - min over the site models on pooled validation
    site_models: dict[str, Scores]  # each site's model on the pooled validation
    consensus_site_val: dict[str, Scores]  # the consensus on each site's validation
    bytes_per_site: dict[str, int]  # sent + received this round
    order: list[str] | None = None  # cyclic: this cycle's visit order
    merges: dict[str, list[str]] | None = None  # gossip: site -> peers merged (accepted steps)
    steps: list[GossipStep] | None = None  # gossip: every step in order


@dataclass(frozen=True)
class PeerState:
    """Everything a peer run carries from round to round (and checkpoints)."""

    models: Mapping[str, Params]  # each site's current model
    versions: gossip.GossipState  # versions count accepted trainings (both topologies)
    carried: Params | None = None  # cyclic: the travelling model
    holder: str | None = None  # cyclic: who holds it (None: the seed-derived initial model)


@dataclass(frozen=True)
class _Round:
    state: PeerState
    updates: list[Update]
    rejected: dict[str, str]
    transfers: list[Transfer]
    participants: list[str]  # cyclic: the visit order
    steps: list[GossipStep] | None = None  # gossip only
    merges: dict[str, list[str]] | None = None  # gossip only


@dataclass(frozen=True)
class _Eval:
    val: Scores
    site_val: dict[str, Scores]
    external: Scores | None
    site_models: dict[str, Scores]
    consensus_site_val: dict[str, Scores]
    consensus: Params


def bytes_per_site(
    sites: Sequence[str], transfers: Sequence[Transfer], nbytes: int
) -> dict[str, int]:
    """Bytes each site sent plus received, every transfer being one whole model."""
    out = dict.fromkeys(sites, 0)
    for t in transfers:
        out[t.sender] += nbytes
        out[t.receiver] += nbytes
    return out


def spread(site_models: Mapping[str, Scores]) -> dict[str, float]:
    """Per metric, the best minus the worst site model (NaN if any site's metric is NaN)."""
    metrics = sorted({m for scores in site_models.values() for m in scores})
    out = {}
    for m in metrics:
        values = [float(s.get(m, math.nan)) for s in site_models.values()]
        out[m] = math.nan if any(math.isnan(v) for v in values) else max(values) - min(values)
    return out


def _site_rounds(updates: Sequence[Update]) -> dict[str, SiteRound]:
    """One row per site; a gossip site that trained twice in a round sums its work."""
    by_site: dict[str, list[Update]] = {}
    for u in updates:
        by_site.setdefault(u.site, []).append(u)
    return {
        site: SiteRound(
            train_loss=float(np.mean([u.metrics.get("train_loss", math.nan) for u in ups])),
            examples=sum(u.num_examples for u in ups),
            steps=sum(int(u.metrics.get("steps", 0)) for u in ups),
        )
        for site, ups in by_site.items()
    }


class _Peers:
    """The sites of one run in this process: one worker model, their data, and the scorers."""

    def __init__(self, config: RunConfig, fed: Federation, device: torch.device) -> None:
        self.config, self.device = config, device
        self.sites = tuple(fed.names)
        self.model = build_model(config, fed).to(device)
        self.algorithm = create_algorithm(
            config, num_sites=len(self.sites), name="fedavg", options={}
        )
        data = {s.name: s.train for s in fed.sites}
        self.data = {k: v.to(device) for k, v in data.items()} if device.type == "cuda" else data
        self.weights = {s.name: float(len(s.train)) for s in fed.sites}
        self.faults = [f for f in config.faults if f.site in self.sites]
        self.scorer = run_scorer(config, fed, device)
        self.evaluator = Evaluator(fed.sites, scorer=self.scorer)
        self.external = fed.external

    def train(self, site: str, start: Params, *, step: int, round_idx: int) -> Update | Failure:
        """``site`` trains from ``start``; its model comes back only if it passes validation.

        ``step`` seeds the randomness (distinct per training at a site), ``round_idx`` selects
        the configured faults, which are given per round as in the star loop.
        """
        fault = fault_for(self.faults, site, round_idx)
        task = LocalTask(site=site, round_idx=step, global_params=start, kind=self.config.task)
        result = guarded_round(
            self.algorithm,
            self.model,
            task,
            self.data[site],
            self.config.train,
            device=self.device,
            seed=self.config.seed,
            fault=fault,
        )
        if isinstance(result, Failure):
            return result
        update = result.update if fault is None else apply_fault(result.update, fault, start)
        reason = validate_update(
            update,
            start,
            expected_keys=None,
            max_relative_norm=self.config.validation.max_relative_update_norm,
        )
        return update if reason is None else Failure(site, reason)

    def visit_order(self, r: int) -> list[str]:
        return cyclic.visit_order(
            self.sites,
            r,
            order=self.config.peer.order,
            rng=numpy_rng(self.config.seed, "cyclic", r),
        )

    def cycle_round(
        self, r: int, state: PeerState, reporter: Reporter, ledger: PeerLedger | None = None
    ) -> _Round:
        """One cycle: the model visits every site once and leaves each as that site's model.

        ``ledger``: each accepted hop is signed by its site; a site whose replica refused the
        chain (a fork) is skipped like a rejected one.
        """
        order = self.visit_order(r)
        assert state.carried is not None
        carried, holder = state.carried, state.holder
        models, versions = dict(state.models), state.versions
        updates, rejected, transfers = [], {}, []
        refused = {} if ledger is None else ledger.deliver()

        def nxt_site(hop: int) -> str | None:
            """Who the model goes to next: the cycle's next site, else the next cycle's first."""
            if hop + 1 < len(order):
                return order[hop + 1]
            return self.visit_order(r + 1)[0] if r + 1 < self.config.federation.rounds else None

        for hop, site in enumerate(order):
            reporter.site(site)
            if site in refused:
                rejected[site] = refused[site]
                continue
            if holder is not None and holder != site:
                transfers.append(Transfer(holder, site))
            # The cycle number is the round index: one site's trainings then draw exactly what a
            # local-only run of that site draws.
            out = self.train(site, carried, step=r, round_idx=r)
            if isinstance(out, Failure):
                rejected[site] = out.reason  # the holder hands the model to the next site instead
                continue
            if ledger is not None:
                ledger.hop(
                    r, hop=hop, update=out, start=carried, sender=holder, receiver=nxt_site(hop)
                )
            carried, holder, models[site] = out.params, site, out.params
            versions = gossip.bump(versions, site, ())
            updates.append(out)
        new = PeerState(models, versions, carried, holder)
        return _Round(new, updates, rejected, transfers, list(order))

    def gossip_round(
        self, r: int, state: PeerState, reporter: Reporter, ledger: PeerLedger | None = None
    ) -> _Round:
        """``num_sites`` steps of pull -> merge -> train -> bump, each at a random site.

        ``ledger``: each accepted step is signed by the pulling site; a site whose replica refused
        the chain (a fork) sits its steps out.
        """
        k = len(self.sites)
        models, versions = dict(state.models), state.versions
        updates, rejected, transfers, steps = [], {}, [], []
        participants: list[str] = []
        merges: dict[str, list[str]] = {}
        refused = {} if ledger is None else ledger.deliver()
        for step in range(r * k, (r + 1) * k):
            site = gossip.choose_site(self.sites, numpy_rng(self.config.seed, "gossip", step))
            reporter.site(site)
            if site in refused:
                rejected[site] = refused[site]
                steps.append(GossipStep(site, [], accepted=False))
                continue
            participants += [] if site in participants else [site]
            peers = gossip.pull(versions, site, policy=self.config.peer.pull)
            transfers += [Transfer(p, site) for p in peers]
            start = gossip.merge(
                models[site],
                {p: models[p] for p in peers},
                own_weight=self.weights[site],
                weights=self.weights,
            )
            out = self.train(site, start, step=step, round_idx=r)
            steps.append(GossipStep(site, peers, accepted=not isinstance(out, Failure)))
            if isinstance(out, Failure):
                rejected[site] = out.reason  # not bumped: it pulls the same peers next time
                continue
            if ledger is not None:
                ledger.step(r, step=step, update=out, merged=peers)
            models[site] = out.params
            versions = gossip.bump(versions, site, peers)
            updates.append(out)
            merges[site] = sorted(set(merges.get(site, [])) | set(peers))
        new = PeerState(models, versions)
        return _Round(new, updates, rejected, transfers, participants, steps, merges)

    def evaluate(self, models: Mapping[str, Params]) -> _Eval:
        """The consensus on pooled, per-site and external validation; each site model on the
        pooled validation (one pass each) with its own site's share sliced out."""
        cons = gossip.consensus(models, self.weights)
        val, cons_site_val = self.evaluator(self.model, self.algorithm, cons, {})
        external = evaluate_external(self.model, cons, self.external, scorer=self.scorer)
        ev = self.evaluator
        pooled = ev.pooled
        bounds = {
            s.name: (s, int(lo), int(hi))
            for s, lo, hi in zip(ev.sites, ev.bounds[:-1], ev.bounds[1:], strict=True)
        }
        site_models: dict[str, Scores] = {}
        site_val: dict[str, Scores] = {}
        for site in self.sites:
            load_params(self.model, models[site], self.device)
            cases = self.scorer.cases(self.model, pooled)
            site_models[site] = self.scorer.metrics(pooled, cases)
            if site in bounds:
                s, lo, hi = bounds[site]
                site_val[site] = self.scorer.metrics(s.val, cases[lo:hi]) | {"n": float(hi - lo)}
        return _Eval(val, site_val, external, site_models, cons_site_val, cons)


def _client_states(state: PeerState) -> dict[str, ClientState]:
    meta = gossip.state_to_tensors(state.versions)
    return {s: {Slot.MODEL: dict(state.models[s]), Slot.META: meta[s]} for s in meta}


def _restore(ckpt: Checkpoint, sites: Sequence[str], device: torch.device) -> PeerState:
    cs = ckpt.client_states
    if set(cs) != set(sites):
        raise FederationError(
            f"checkpoint holds sites {sorted(cs)}, the federation {sorted(sites)}"
        )
    carried = ckpt.state.buffers.get(Slot.CARRY)
    holder = ckpt.meta.get(Slot.HOLDER)
    return PeerState(
        models={s: _to_device(cs[s][Slot.MODEL], device) for s in sites},
        versions=gossip.state_from_tensors({s: cs[s][Slot.META] for s in sites}),
        carried=None if carried is None else _to_device(carried, device),
        holder=None if holder is None else str(holder),
    )


def _peer_summary(history: History, topology: str) -> dict[str, Any]:
    rows = [row["extra"][PEER_KEY] for row in history if PEER_KEY in row.get("extra", {})]
    totals: dict[str, int] = {}
    for row in rows:
        for site, n in row["bytes_per_site"].items():
            totals[site] = totals.get(site, 0) + int(n)
    last = rows[-1] if rows else {}
    return {
        "topology": topology,
        "spread": last.get("spread", {}),
        "site_models": last.get("site_models", {}),
        "bytes_per_site": totals,
    }


def run_peer(
    config: RunConfig,
    federation: Federation,
    *,
    out_dir: Path,
    resume: bool,
    reporter: Reporter,
    label: str,
) -> RunResult:
    """Run a cyclic or gossip federation into ``out_dir`` (same files as a star run)."""
    if config.paradigm not in PEER_PARADIGMS:
        raise ValueError(f"run_peer runs {sorted(PEER_PARADIGMS)}, not {config.paradigm}")
    if config.privacy.dp is not None or config.privacy.he is not None:
        # The accountant and the encrypted sum both assume an aggregator; a peer run has none.
        raise FederationError(
            f"privacy.dp and privacy.he need a server; not with {config.paradigm}"
        )
    if config.federation.strategy.name != "fedavg":
        reporter.warn(
            f"{config.paradigm}: sites train plainly and merge by weighted averaging; "
            f"strategy {config.federation.strategy.name!r} is not used"
        )
    _prepare_dir(out_dir, config, resume=resume)
    device = resolve_device(config.device)
    peers = _Peers(config, federation, device)
    init = read_params(peers.model)
    is_cyclic = config.paradigm is Paradigm.CYCLIC
    state = PeerState(
        models=dict.fromkeys(peers.sites, init),
        versions=gossip.GossipState.start(peers.sites),
        carried=init if is_cyclic else None,
    )
    chash = config_hash(config)
    hist_path = out_dir / "history.jsonl"
    history, start_round, wall_offset = History(hist_path), 0, 0.0
    if resume:
        ckpt = load_latest(out_dir)
        if ckpt is None:
            history = History.resume(hist_path, upto_round=-1)
        else:
            mismatch = resume_mismatch(out_dir, ckpt.meta.get("config_hash"), config)
            if mismatch is not None:
                raise FederationError(mismatch)
            state = _restore(ckpt, peers.sites, device)
            start_round = ckpt.round_idx + 1
            wall_offset = float(ckpt.meta.get("wall_seconds", 0.0))
            history = History.resume(hist_path, upto_round=ckpt.round_idx)
    ledger = PeerLedger.for_run(config, out_dir, sites=peers.sites, config_hash=chash)
    if ledger is not None:  # a resumed run appends to the same chain
        v = state.versions.versions
        ledger.begin_peer(start_round - 1, initial=init, models=state.models, versions=v)
    nbytes = params_nbytes(init)
    rounds = config.federation.rounds
    t_start = time.perf_counter()
    reporter.start(label, total=rounds, completed=start_round)
    for r in range(start_round, rounds):
        t0 = time.perf_counter()
        done = (
            peers.cycle_round(r, state, reporter, ledger)
            if is_cyclic
            else peers.gossip_round(r, state, reporter, ledger)
        )
        state = done.state
        for site, reason in done.rejected.items():
            reporter.warn(f"round {r}: rejected model from site {site!r}: {reason}")
        ev = peers.evaluate(state.models)
        moved = nbytes * len(done.transfers)
        extra = PeerRound(
            topology=str(config.paradigm),
            spread=spread(ev.site_models),
            site_models=ev.site_models,
            consensus_site_val=ev.consensus_site_val,
            bytes_per_site=bytes_per_site(peers.sites, done.transfers, nbytes),
            order=done.participants if is_cyclic else None,
            merges=done.merges,
            steps=done.steps,
        )
        record = RoundRecord(
            round=r,
            participants=done.participants,
            sites=_site_rounds(done.updates),
            val=dict(ev.val),
            site_val=ev.site_val,
            rejected=done.rejected,
            bytes_up=moved,  # every transfer is one site's upload and another's download
            bytes_down=moved,
            seconds=time.perf_counter() - t0,
            external=ev.external,
            extra={PEER_KEY: asdict(extra)},
        )
        history.append(record)
        if ledger is not None:
            ledger.peer_round(
                r,
                consensus=ev.consensus,
                included=[u.site for u in done.updates],
                rejected=done.rejected,
                order=done.participants,
                versions=state.versions.versions,
                steps=[asdict(s) for s in done.steps or []],
            )
        ckpt_dir = save_checkpoint(
            out_dir,
            round_idx=r,
            global_params=ev.consensus,
            state=StrategyState(
                round=r + 1, buffers={} if state.carried is None else {Slot.CARRY: state.carried}
            ),
            client_states=_client_states(state),
            meta={
                "config_hash": chash,
                "seed": config.seed,
                "rng": "derived per (seed, cycle or step, site) via sha256; no state to restore",
                "wall_seconds": wall_offset + time.perf_counter() - t_start,
                Slot.HOLDER: state.holder,
            },
            keep_last=config.checkpoint.keep_last,
        )
        if ledger is not None:
            ledger.checkpoint(r, ckpt_dir)
        reporter.round_done(record)
    final = gossip.consensus(state.models, peers.weights)
    save_params(final, out_dir / "final.safetensors")
    if ledger is not None:
        ledger.end(rounds=len(history), final_params=final, final=out_dir / "final.safetensors")
    summary = run_summary(history, config, chash, wall_offset + time.perf_counter() - t_start)
    summary[PEER_KEY] = _peer_summary(history, str(config.paradigm))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    reporter.stop()
    return RunResult(history, summary, final)
