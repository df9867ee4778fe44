"""The round loop: plan -> local updates -> validate -> aggregate -> evaluate -> record -> checkpoint.

The engine owns the loop and nothing else: the topology says who trains, the runtime carries the
work, the algorithm's pure ``aggregate`` merges. Every completed round is checkpointed, so a run
that dies resumes from its last completed round and ends bit-identical to one that never died.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from medfed.algorithms import Algorithm, FederationContext
from medfed.algorithms.base import load_params, read_params
from medfed.audit.run import RunLedger
from medfed.build import build_model, load_federation, run_scorer
from medfed.checkpoint import load_latest, save_checkpoint, save_params
from medfed.client.train import resolve_device
from medfed.config import RunConfig, config_hash, dump_config, resume_mismatch
from medfed.data.site import Federation, Site
from medfed.evaluation import PRIMARY_METRIC, Evaluator, Scores, evaluate_external
from medfed.history import History, RoundRecord, SiteRound, run_summary
from medfed.privacy.run import EncryptedAggregation, RoundPrivacy, create_algorithm
from medfed.progress import Reporter
from medfed.runtime.inprocess import Failure, InProcessRuntime, Outcome
from medfed.runtime.vectorized import run_mode
from medfed.seeding import numpy_rng
from medfed.topologies.star import StarTopology
from medfed.types import Buffers, ClientState, Paradigm, Params, params_nbytes
from medfed.validation import validate_update


class FederationError(RuntimeError):
    """The federation cannot go on (e.g. too few valid updates); the last round is checkpointed."""


@dataclass(frozen=True)
class RunResult:
    history: History
    summary: dict[str, Any]
    final_params: Params


def _to_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> Params:
    return {k: v.to(device) for k, v in tensors.items()}


def _prepare_dir(out_dir: Path, config: RunConfig, *, resume: bool) -> None:
    if not resume:
        if (out_dir / "history.jsonl").exists() or (out_dir / "checkpoints").exists():
            raise FileExistsError(
                f"{out_dir} already holds a run; resume it with `medfed run --resume {out_dir}` "
                "or choose another --out"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, out_dir / "config.yaml")


@dataclass(frozen=True)
class RoundEval:
    """What the server learns about the new global model each round (metrics only).

    ``val`` is the pooled internal validation ({auc, acc} for classification; {dice, jaccard,
    pixel_acc, mean_image_dice} for segmentation), ``site_val`` the same per site plus ``n``.
    """

    val: Scores
    site_val: dict[str, Scores]
    external: Scores | None = None


class Runtime(Protocol):
    """Carries tasks to sites and updates back (in-process here; Flower's Grid in deployment)."""

    client_states: dict[str, ClientState]  # site-held state the server may checkpoint (simulation)

    def execute(
        self,
        round_idx: int,
        participants: Sequence[str],
        global_params: Params,
        payload: Buffers,
        *,
        on_site: Callable[[str], None] | None = None,
    ) -> list[Outcome]: ...


# (round index, global model, per-site state) -> the round's scores; the loop owns the index, so
# a resumed run's evaluations are numbered from its checkpoint without the caller counting.
Evaluate = Callable[[int, Params, Mapping[str, ClientState]], RoundEval]


def _train_rounds(
    config: RunConfig,
    *,
    train_sites: Sequence[Site],
    eval_sites: Sequence[Site],
    external: Site | None,
    strategy_name: str,
    strategy_options: Mapping[str, Any],
    min_clients: int,
    fraction: float,
    out_dir: Path,
    resume: bool,
    reporter: Reporter,
    label: str,
) -> RunResult:
    """The simulator: every site is a direct call on one worker model in this process."""
    _prepare_dir(out_dir, config, resume=resume)
    device = resolve_device(config.device)
    fed = Federation(tuple(train_sites))
    model = build_model(config, fed).to(device)
    algorithm = create_algorithm(
        config,
        num_sites=len(train_sites),
        name=strategy_name,
        options=strategy_options,
        fraction=fraction,
    )
    site_names = tuple(s.name for s in train_sites)
    runtime = InProcessRuntime(
        model=model,
        algorithm=algorithm,
        data={s.name: s.train for s in train_sites},
        opts=config.train,
        device=device,
        seed=config.seed,
        faults=[f for f in config.faults if f.site in site_names],
        task=config.task,
        vectorize=run_mode(config.runtime.vectorize, device),
        vector_min_clients=config.runtime.vector_min_clients,
        vector_chunk=config.runtime.vector_chunk,
    )
    scorer = run_scorer(config, fed, device)
    evaluator = Evaluator(eval_sites, scorer=scorer)

    def evaluate(
        _round: int, global_params: Params, client_states: Mapping[str, ClientState]
    ) -> RoundEval:
        if not config.runtime.site_metrics and all(
            algorithm.personalize(global_params, cs) is global_params
            for cs in client_states.values()
        ):
            # Pooled validation only: a federation of hundreds of sites, everyone on one model.
            load_params(model, global_params, scorer.device)
            val = scorer.metrics(evaluator.pooled, scorer.cases(model, evaluator.pooled))
            ext = evaluate_external(model, global_params, external, scorer=scorer)
            return RoundEval(val, {}, ext)
        val, site_val = evaluator(model, algorithm, global_params, client_states)
        ext = evaluate_external(model, global_params, external, scorer=scorer)
        return RoundEval(val, site_val, ext)

    return train_loop(
        config,
        model=model,
        algorithm=algorithm,
        site_names=site_names,
        runtime=runtime,
        evaluate=evaluate,
        device=device,
        min_clients=min_clients,
        fraction=fraction,
        out_dir=out_dir,
        resume=resume,
        reporter=reporter,
        label=label,
    )


def train_loop(
    config: RunConfig,
    *,
    model: nn.Module,
    algorithm: Algorithm,
    site_names: tuple[str, ...],
    runtime: Runtime,
    evaluate: Evaluate,
    device: torch.device,
    min_clients: int,
    fraction: float,
    out_dir: Path,
    resume: bool,
    reporter: Reporter,
    label: str,
    resume_command: str | None = "medfed run --resume {out_dir}",
) -> RunResult:
    """plan -> execute -> validate -> aggregate -> evaluate -> record -> checkpoint, per round.

    Runtime-agnostic: the in-process simulator and the Flower ServerApp both drive this loop, so a
    federation behaves the same whichever carries it. ``model`` gives the initial weights and the
    architecture the strategy inspects; the server never trains it.
    """
    global_params = read_params(model)
    state = algorithm.init(global_params, context=FederationContext(model=model, sites=site_names))
    topology = StarTopology(fraction=fraction, min_clients=min_clients)
    chash = config_hash(config)
    start_round = 0
    hist_path = out_dir / "history.jsonl"
    history = History(hist_path)
    wall_offset = 0.0
    privacy = RoundPrivacy.for_run(config, algorithm, site_names)
    encrypted = EncryptedAggregation.for_run(config, algorithm, runtime=runtime)
    ledger = RunLedger.for_run(
        config, out_dir, site_names=site_names, runtime=runtime, config_hash=chash
    )
    stopped: str | None = None
    if resume:
        ckpt = load_latest(out_dir)
        if ckpt is not None:
            mismatch = resume_mismatch(out_dir, ckpt.meta.get("config_hash"), config)
            if mismatch is not None:
                raise FederationError(mismatch)
            # Checkpoints hold host tensors; the federation runs where the model is.
            global_params = _to_device(ckpt.global_params, device)
            state = replace(
                ckpt.state,
                buffers={g: _to_device(b, device) for g, b in ckpt.state.buffers.items()},
            )
            runtime.client_states = {
                site: {g: _to_device(b, device) for g, b in cs.items()}
                for site, cs in ckpt.client_states.items()
            }
            start_round = ckpt.round_idx + 1
            wall_offset = float(ckpt.meta.get("wall_seconds", 0.0))
            if privacy is not None:
                privacy.restore(ckpt.meta.get("privacy"))
            history = History.resume(hist_path, upto_round=ckpt.round_idx)
        else:
            history = History.resume(hist_path, upto_round=-1)
    if ledger is not None:  # a resumed run continues the same chain (medfed.audit.run)
        ledger.begin(
            last_round=start_round - 1,
            strategy=algorithm.name,
            runtime_name=type(runtime).__name__,
            sites=site_names,
        )
    rounds = config.federation.rounds
    max_norm = config.validation.max_relative_update_norm
    if encrypted is not None or (
        config.privacy.dp is not None and str(config.privacy.dp.mode) == "local"
    ):
        # Local DP noise is large by design (σC per coordinate); the site's clip bounds the
        # signal, so the relative-norm screen would reject every honest update. Under HE the
        # aggregator cannot compute a norm at all.
        max_norm = float("inf")
    expected = None if algorithm.uploaded_keys() is None else set(algorithm.uploaded_keys() or ())
    t_start = time.perf_counter()
    reporter.start(label, total=rounds, completed=start_round)
    for r in range(start_round, rounds):
        if stopped:
            break
        t0 = time.perf_counter()
        plan = topology.plan(r, site_names, numpy_rng(config.seed, "sample", r))
        participants = list(plan.participants)
        rejected: dict[str, str] = {}
        if privacy is not None:
            admission = privacy.admit(participants, min_clients=min_clients)
            if admission.stop is not None:
                stopped = f"round {r}: {admission.stop}"
                reporter.warn(f"stopping: {stopped}")
                break
            participants, rejected = admission.participants, dict(admission.refused)
        if ledger is not None:  # simulated sites check the chain they are sent, or refuse
            rejected |= ledger.deliver(participants)
            participants = [s for s in participants if s not in rejected]
        payload = algorithm.payload(state)
        outcomes = runtime.execute(
            r, participants, global_params, payload, on_site=lambda s: reporter.site(s)
        )
        accepted = []
        for o in outcomes:
            if isinstance(o, Failure):
                rejected[o.site] = o.reason
                continue
            if ledger is not None and (why := ledger.admit(r, o)) is not None:
                rejected[o.site] = why  # no valid site signature over what arrived
                continue
            screen = validate_update if encrypted is None else encrypted.validate
            reason = screen(
                o,
                global_params,
                expected_keys=expected,
                max_relative_norm=max_norm,
            )
            if reason is None:
                accepted.append(o)
            else:
                rejected[o.site] = reason
        for site, reason in rejected.items():
            reporter.warn(f"round {r}: rejected update from site {site!r}: {reason}")
        if len(accepted) < min_clients:
            raise FederationError(
                f"round {r}: only {len(accepted)} valid update(s) from {len(participants)} "
                f"sampled site(s), min_clients={min_clients}; rejected: "
                + "; ".join(f"{s}: {why}" for s, why in rejected.items())
                + (
                    f". Fix the sites, then `{resume_command.format(out_dir=out_dir)}`"
                    if r and resume_command
                    else ""
                )
            )
        payload_bytes = sum(params_nbytes(p) for p in payload.values())
        bytes_down = len(participants) * (params_nbytes(global_params) + payload_bytes)
        bytes_up = sum(
            params_nbytes(u.params) + sum(params_nbytes(x) for x in u.extras.values())
            for u in accepted
        )
        extra: dict[str, Any] = {}
        if encrypted is None:
            global_params, state = algorithm.aggregate(global_params, accepted, state, round_idx=r)
        else:
            global_params, state, extra["he"] = encrypted.aggregate(global_params, accepted, state)
            bytes_up = extra["he"]["bytes_up"]
            bytes_down = len(participants) * (extra["he"]["aggregate_bytes"] + payload_bytes)
        spent = None if privacy is None else privacy.record(accepted, state)
        if ledger is not None:
            ledger.round(
                r,
                global_params=global_params,
                strategy=algorithm.name,
                included=[u.site for u in accepted],
                rejected=rejected,
                privacy=spent,
            )
        ev = evaluate(r, global_params, runtime.client_states)
        record = RoundRecord(
            round=r,
            participants=list(participants),
            sites={
                u.site: SiteRound(
                    train_loss=float(u.metrics.get("train_loss", float("nan"))),
                    examples=u.num_examples,
                    steps=int(u.metrics.get("steps", 0)),
                )
                for u in accepted
            },
            val=dict(ev.val),
            site_val=ev.site_val,
            rejected=rejected,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            seconds=time.perf_counter() - t0,
            external=None if ev.external is None else dict(ev.external),
            privacy=spent,
            extra=extra,
        )
        history.append(record)
        ckpt_dir = save_checkpoint(
            out_dir,
            round_idx=r,
            global_params=global_params,
            state=state,
            client_states=runtime.client_states,
            meta={
                "config_hash": chash,
                "seed": config.seed,
                "rng": "derived per (seed, round, site) via sha256; no state to restore",
                "wall_seconds": wall_offset + time.perf_counter() - t_start,
            }
            | ({} if privacy is None else {"privacy": privacy.to_meta()}),
            keep_last=config.checkpoint.keep_last,
        )
        if ledger is not None:
            ledger.checkpoint(r, ckpt_dir)
        reporter.round_done(record)
    save_params(global_params, out_dir / "final.safetensors")
    if ledger is not None:
        ledger.end(
            rounds=len(history),
            global_params=global_params,
            final=out_dir / "final.safetensors",
            stopped=stopped,
        )
    summary = run_summary(history, config, chash, wall_offset + time.perf_counter() - t_start)
    if stopped:
        summary["stopped"] = stopped
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    reporter.stop()
    return RunResult(history, summary, global_params)


def run(
    config: RunConfig,
    *,
    out_dir: str | Path,
    resume: bool = False,
    federation: Federation | None = None,
    progress: bool = True,
    tag: str = "",
) -> RunResult:
    """Run ``config`` into ``out_dir``; see README for the files written there.

    ``tag`` prefixes progress labels (a study shows which network is training).
    """
    out_dir = Path(out_dir)
    data_report = None
    if federation is None:
        federation, data_report = load_federation(config.data)
    result = _run(config, federation, out_dir=out_dir, resume=resume, progress=progress, tag=tag)
    if data_report is not None:
        # Real data: what was loaded and which files were skipped (on_error: skip) go with the run.
        result.summary["data"] = data_report
        result.summary["data_skipped"] = sum(len(x["skipped"]) for x in data_report["sites"])
        (out_dir / "summary.json").write_text(json.dumps(result.summary, indent=2))
    return result


def _run(
    config: RunConfig,
    fed: Federation,
    *,
    out_dir: Path,
    resume: bool,
    progress: bool,
    tag: str,
) -> RunResult:
    unknown = sorted({f.site for f in config.faults} - set(fed.names))
    if unknown:
        raise FederationError(
            f"faults name unknown site(s) {unknown}; sites: {', '.join(fed.names)}"
        )
    try:
        fed.check_task(config.task)
    except ValueError as err:
        raise FederationError(str(err)) from None
    reporter = Reporter(enabled=progress)
    fcfg = config.federation
    if config.paradigm in (Paradigm.CYCLIC, Paradigm.GOSSIP):
        from medfed.peer import run_peer  # lazy: medfed.peer imports this module

        label = f"{tag}{config.paradigm}"
        return run_peer(config, fed, out_dir=out_dir, resume=resume, reporter=reporter, label=label)
    if config.paradigm is Paradigm.ONE_SHOT:
        from medfed.one_shot import run_one_shot  # lazy: medfed.one_shot imports this module

        label = f"{tag}one-shot"
        return run_one_shot(
            config, fed, out_dir=out_dir, resume=resume, reporter=reporter, label=label
        )
    common = dict(eval_sites=fed.sites, external=fed.external, reporter=reporter)
    if config.paradigm is Paradigm.FEDERATED:
        if fcfg.min_clients > len(fed.sites):
            raise FederationError(
                f"min_clients={fcfg.min_clients} but the federation has {len(fed.sites)} sites"
            )
        return _train_rounds(
            config,
            train_sites=fed.sites,
            strategy_name=fcfg.strategy.name,
            strategy_options=fcfg.strategy.options,
            min_clients=fcfg.min_clients,
            fraction=fcfg.fraction,
            out_dir=out_dir,
            resume=resume,
            label=f"{tag}federated",
            **common,  # type: ignore[arg-type]
        )
    if config.paradigm is Paradigm.CENTRALIZED:
        # One client holding the pooled data: FedAvg of one client is that client, so each
        # "round" is plain training with the same per-round sample budget as FedAvg.
        return _train_rounds(
            config,
            train_sites=[fed.pooled("pooled")],
            strategy_name="fedavg",
            strategy_options={},
            min_clients=1,
            fraction=1.0,
            out_dir=out_dir,
            resume=resume,
            label=f"{tag}centralized",
            **common,  # type: ignore[arg-type]
        )
    # Local-only: each site trains alone; every model is judged on everyone's validation data.
    _prepare_dir(out_dir, config, resume=resume)
    results = {}
    for site in fed.sites:
        results[site.name] = _train_rounds(
            config,
            train_sites=[site],
            strategy_name="fedavg",
            strategy_options={},
            min_clients=1,
            fraction=1.0,
            out_dir=out_dir / "local" / site.name,
            resume=resume and (out_dir / "local" / site.name).exists(),
            label=f"{tag}local {site.name}",
            **common,  # type: ignore[arg-type]
        )
    primary = PRIMARY_METRIC[config.task]

    def score(res: RunResult) -> float:
        value = res.summary["val"].get(primary)
        return float("nan") if value is None else float(value)

    summary = {
        "name": config.name,
        "paradigm": str(config.paradigm),
        "task": str(config.task),
        "model": config.model.name,
        "sites": {name: res.summary for name, res in results.items()},
        f"val_{primary}_mean": float(np.nanmean([score(res) for res in results.values()])),
        "config_hash": config_hash(config),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    best = max(results.values(), key=lambda res: np.nan_to_num(score(res), nan=-np.inf))
    return RunResult(best.history, summary, best.final_params)
