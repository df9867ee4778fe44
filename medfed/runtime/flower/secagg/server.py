"""SecAgg+ server half: the array layout both halves share, and the ServerApp's strategy."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from medfed.algorithms.base import read_params
from medfed.checkpoint import save_checkpoint, save_params
from medfed.config import RunConfig, config_hash
from medfed.engine import FederationError, RunResult, _prepare_dir
from medfed.history import History, RoundRecord, SiteRound, run_summary
from medfed.privacy.config import DPMode
from medfed.privacy.run import RoundPrivacy, create_algorithm
from medfed.progress import Reporter
from medfed.runtime.flower.codec import Field, Key, as_int
from medfed.runtime.flower.secagg.layout import params_to_ndarrays
from medfed.runtime.flower.secagg.plan import (
    MODULUS_RANGE,
    SECURE_AGGREGATION,
    SecAggOptions,
    SecAggPlan,
    check_dp_clipping,
    check_secagg,
    dp_clipping_range,
    error_bound,
    max_examples,
    max_steps,
    round_shares_problem,
)
from medfed.runtime.flower.server import FlowerRuntime, discover, discovered_model
from medfed.seeding import numpy_rng
from medfed.topologies.star import StarTopology
from medfed.types import Params, StrategyState, params_nbytes

# --------------------------------------------------------------------------- server half


@dataclass
class _Round:
    round_idx: int
    participants: tuple[str, ...]
    refused: dict[str, str]  # sampled, but kept out by their privacy budget
    started: float


class SecAggFedAvg(FedAvg):
    """Flower's FedAvg driven by medfed: medfed's initial model, sampling and bookkeeping.

    Under ``SecAggPlusWorkflow``, ``aggregate_fit`` receives one securely aggregated vector (every
    result carries the same one); it is turned back into medfed ``Params``, evaluated, recorded
    and checkpointed here. With ``privacy`` (``privacy.dp`` local or dpsgd) the round's sample
    passes :meth:`RoundPrivacy.admit` first, and each contributing site's ε is booked from what
    the server knows without seeing an update: the mechanism and the site's training-set size.
    """

    def __init__(
        self,
        *,
        config: RunConfig,
        plan: SecAggPlan,
        nodes: Mapping[str, int],
        initial: Params,
        max_weight: float,
        step_scale: float,
        evaluate: Callable[[int, Params], Any],
        out_dir: Path,
        reporter: Reporter,
        privacy: RoundPrivacy | None = None,
        train_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        self.privacy = privacy
        self.train_sizes = dict(train_sizes or {})
        if privacy is not None and set(self.train_sizes) != set(nodes):
            raise ValueError("privacy accounting needs every site's training-set size")
        self.stopped: str | None = None
        self.plan = plan
        self.nodes = dict(nodes)
        self.site_of = {node: site for site, node in self.nodes.items()}
        self.global_params = {k: v.detach().cpu().clone() for k, v in initial.items()}
        self.keys = list(self.global_params)
        self.max_weight = max_weight
        self.step_scale = step_scale
        self.evaluate_global = evaluate
        self.out_dir = out_dir
        self.reporter = reporter
        self.topology = StarTopology(
            fraction=config.federation.fraction, min_clients=config.federation.min_clients
        )
        self.history = History(out_dir / "history.jsonl")
        self.config_json = config.model_dump_json()
        self.config_hash = config_hash(config)
        self.rounds_done = 0
        self.current: _Round | None = None
        self.t_start = time.perf_counter()
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=plan.sampled,
            min_evaluate_clients=0,
            min_available_clients=plan.num_sites,
            accept_failures=True,
            initial_parameters=ndarrays_to_parameters(
                params_to_ndarrays(self.global_params, self.keys)
            ),
        )

    def __repr__(self) -> str:
        return f"SecAggFedAvg({self.config.federation.strategy.name}, secagg+)"

    def start_round(self, r: int) -> bool:
        """Sample round ``r`` and admit it against the privacy budgets; False (and ``stopped``
        says why) when the run must end instead, as ``train_loop`` ends it."""
        if self.stopped is not None:
            return False
        sites = tuple(self.nodes)
        plan = self.topology.plan(r, sites, numpy_rng(self.config.seed, "sample", r))
        participants, refused = tuple(plan.participants), {}
        if self.privacy is not None:
            admission = self.privacy.admit(
                participants, min_clients=self.config.federation.min_clients
            )
            refused = dict(admission.refused)
            why = admission.stop
            if why is None and refused:  # fewer sites than sampled: still a secure round?
                problem = round_shares_problem(self.plan, len(admission.participants))
                if problem is not None:
                    why = (
                        "privacy budget exhausted: "
                        + problem
                        + "; "
                        + "; ".join(f"{s}: {reason}" for s, reason in sorted(refused.items()))
                    )
            if why is not None:
                self.stopped = f"round {r}: {why}"
                self.reporter.warn(f"stopping: {self.stopped}")
                return False
            participants = tuple(admission.participants)
        self.current = _Round(r, participants, refused, time.perf_counter())
        return True

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        r = server_round - 1
        if (self.current is None or self.current.round_idx != r) and not self.start_round(r):
            return []  # the workflow cancels a round with no clients
        assert self.current is not None
        participants = self.current.participants
        proxies = {p.node_id: p for p in client_manager.all().values()}
        gone = [s for s in participants if self.nodes[s] not in proxies]
        if gone:
            raise FederationError(
                f"round {r}: sampled site(s) {', '.join(gone)} are no longer connected"
            )
        fit_config: dict[str, Scalar] = {
            Field.CONFIG: self.config_json,
            Field.ROUND: r,
            Field.SECAGG_KEYS: json.dumps(self.keys),
            Field.SECAGG_MAX_WEIGHT: float(self.max_weight),
            Field.SECAGG_STEP_SCALE: float(self.step_scale),
            Field.SECAGG_CLIPPING_RANGE: float(self.plan.options.clipping_range),
            Field.SECAGG_QUANTIZATION_RANGE: int(self.plan.options.quantization_range),
        }
        for site in participants:
            self.reporter.site(site)
        fit_ins = FitIns(parameters, fit_config)
        return [(proxies[self.nodes[s]], fit_ins) for s in participants]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        r = server_round - 1
        assert self.current is not None, "aggregate_fit before configure_fit"
        participants = self.current.participants
        counts = {self.site_of[p.node_id]: int(res.num_examples) for p, res in results}
        contributed = [s for s in participants if s in counts]
        dropped = [s for s in participants if s not in counts]
        reasons = "; ".join(str(f) for f in failures if isinstance(f, BaseException))
        rejected = {
            s: "no masked update: dropped out of secure aggregation"
            + (f" ({reasons})" if reasons else "")
            for s in dropped
        }
        rejected = self.current.refused | rejected
        for site, why in rejected.items():
            self.reporter.warn(f"round {r}: site {site!r}: {why}")
        min_clients = self.config.federation.min_clients
        if len(contributed) < min_clients or not results:
            raise FederationError(
                f"round {r}: {len(contributed)} site(s) contributed to the secure sum, "
                f"min_clients={min_clients}; dropped: {', '.join(dropped) or 'none'}"
            )
        arrays = parameters_to_ndarrays(results[0][1].parameters)
        if len(arrays) != len(self.keys) + 1:
            raise FederationError(
                f"round {r}: the secure sum has {len(arrays)} arrays, expected "
                f"{len(self.keys) + 1} (model tensors + medfed's extras)"
            )
        extras = np.asarray(arrays[-1], dtype=np.float64).reshape(-1)
        train_loss, clipped = float(extras[0]), float(extras[1])
        # One clipping site pulls the flag's weighted mean up to at least its weight share;
        # the quantisation error is orders of magnitude below that.
        flag_floor = 0.5 * min(counts.values()) / max(sum(counts.values()), 1)
        if clipped > flag_floor:
            message = (
                f"round {r}: sites holding {clipped:.0%} of the round's examples clipped "
                f"values to ±{self.plan.options.clipping_range:g} before quantisation: the "
                "aggregate is biased. Raise clipping_range (and keep the parameters within it)"
            )
            needed = dp_clipping_range(self.config, self.global_params)
            if needed is not None:
                message += (
                    f"; with privacy.dp mode local the range must also hold the sites' noise: "
                    f"at least {math.ceil(needed):d} for the current weights"
                )
            if not self.plan.options.allow_clipping:
                raise FederationError(message + ", or set allow_clipping")
            self.reporter.warn(message)
        new = self._unpack(arrays[:-1])
        self.global_params = new
        ev = self.evaluate_global(r, new)
        nbytes = params_nbytes(new)
        spent = None
        if self.privacy is not None:
            events = {
                s: self.privacy.planned_event(self.train_sizes[s], self.config.train)
                for s in contributed
            }
            spent = self.privacy.record_events(events, StrategyState(round=r + 1))
        # masked uploads are int64: one per tensor element, plus the weight and the extras
        upload_elems = 1 + sum(int(a.size) for a in arrays)
        record = RoundRecord(
            round=r,
            participants=contributed,
            sites={
                s: SiteRound(train_loss=float("nan"), examples=counts[s], steps=0)
                for s in contributed
            },
            val=dict(ev.val),
            site_val=ev.site_val,
            rejected=rejected,
            bytes_up=len(contributed) * 8 * upload_elems,
            bytes_down=len(participants) * nbytes,
            seconds=time.perf_counter() - self.current.started,
            external=None if ev.external is None else dict(ev.external),
            privacy=spent,
            extra={
                "secure_aggregation": SECURE_AGGREGATION,
                "train_loss": train_loss,
                "clipped_share": max(clipped, 0.0),
                "error_bound": error_bound(
                    self.plan.options, max_weight=self.max_weight, examples=list(counts.values())
                ),
            },
        )
        self.history.append(record)
        save_checkpoint(
            self.out_dir,
            round_idx=r,
            global_params=new,
            state=StrategyState(round=r + 1),
            client_states={},
            meta={
                "config_hash": self.config_hash,
                "seed": self.config.seed,
                "secure_aggregation": SECURE_AGGREGATION,
                "wall_seconds": time.perf_counter() - self.t_start,
            }
            | ({} if self.privacy is None else {"privacy": self.privacy.to_meta()}),
            keep_last=self.config.checkpoint.keep_last,
        )
        self.reporter.round_done(record)
        self.rounds_done += 1
        self.current = None
        return ndarrays_to_parameters(params_to_ndarrays(new, self.keys)), {}

    def _unpack(self, arrays: NDArrays) -> Params:
        """The mean as medfed Params: floats as they are, integers as global + rounded delta."""
        out: Params = {}
        for k, a in zip(self.keys, arrays, strict=True):
            ref = self.global_params[k]
            if a.size != ref.numel():  # sites upload flat arrays (see upload_vector)
                raise FederationError(f"{k!r}: {a.size} aggregated values for {ref.numel()}")
            t = torch.from_numpy(np.array(a, dtype=np.float64, copy=True)).reshape(ref.shape)
            if ref.is_floating_point():
                out[k] = t.to(ref.dtype)
            else:
                delta = torch.round(t * self.step_scale)
                out[k] = (ref.to(torch.float64) + delta).round().to(ref.dtype)
        return out


def _train_sizes(
    grid: Grid, config: RunConfig, nodes: Mapping[str, int], *, timeout: float
) -> dict[str, int]:
    """Each site's training-set size (``describe``'s n_train): what max_weight must cover."""
    task = ConfigRecord({Field.CONFIG: config.model_dump_json(), Field.ROUND: -1})
    msgs = [
        Message(RecordDict({Key.TASK: task}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes.values()
    ]
    site_of = {n: s for s, n in nodes.items()}
    sizes: dict[str, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise FederationError(
                f"SuperNode {reply.metadata.src_node_id} cannot serve this run: "
                f"{reply.error.reason}"
            )
        sizes[site_of[reply.metadata.src_node_id]] = as_int(
            reply.content.config_records[Key.SITE][Field.N_TRAIN]
        )
    missing = sorted(set(nodes) - set(sizes))
    if missing:
        raise FederationError(f"site(s) {', '.join(missing)} did not report their data size")
    return sizes


def serve_secagg(
    grid: Grid,
    context: Context,
    config: RunConfig,
    *,
    out_dir: str | Path,
    num_sites: int,
    options: SecAggOptions | None = None,
    progress: bool = True,
) -> RunResult:
    """The ServerApp's body: discover the sites, then Flower's SecAgg+ workflow, round by round."""
    out_dir = Path(out_dir)
    plan = check_secagg(config, num_sites, options)
    opts = plan.options
    _prepare_dir(out_dir, config, resume=False)
    nodes, shape, spatial = discover(grid, config, expected=num_sites, timeout=opts.timeout)
    if len(nodes) != plan.num_sites:  # more SuperNodes than expected joined: check again
        plan = check_secagg(config, len(nodes), opts)
    sizes = _train_sizes(grid, config, nodes, timeout=opts.timeout)
    dp = config.privacy.dp
    poisson = dp is not None and dp.mode is DPMode.DPSGD
    needed = max(max_examples(n, config.train, poisson=poisson) for n in sizes.values())
    if opts.max_weight is not None and opts.max_weight < needed:
        raise FederationError(
            f"max_weight={opts.max_weight:g} but a site may report {needed} examples per round "
            f"(training-set sizes {sizes}, train.epochs={config.train.epochs:g}"
            + (", DP-SGD's Poisson batches" if poisson else "")
            + "); its weight "
            "would be clipped. Raise max_weight or leave it unset to derive it"
        )
    max_weight = float(opts.max_weight or needed)
    step_scale = float(max(max_steps(n, config.train) for n in sizes.values()))
    model = discovered_model(config, shape, spatial)
    initial = read_params(model)
    check_dp_clipping(config, opts, initial)
    algorithm = create_algorithm(config, num_sites=len(nodes))
    privacy = RoundPrivacy.for_run(config, algorithm, tuple(nodes))
    runtime = FlowerRuntime(grid, nodes=nodes, config=config, timeout=opts.timeout)
    reporter = Reporter(enabled=progress)
    strategy = SecAggFedAvg(
        config=config,
        plan=plan,
        nodes=nodes,
        initial=initial,
        max_weight=max_weight,
        step_scale=step_scale,
        evaluate=runtime.evaluate,
        out_dir=out_dir,
        reporter=reporter,
        privacy=privacy,
        train_sizes=sizes,
    )
    secagg = SecAggPlusWorkflow(
        num_shares=plan.num_shares,
        reconstruction_threshold=plan.threshold,
        max_weight=max_weight,
        clipping_range=opts.clipping_range,
        quantization_range=opts.quantization_range,
        modulus_range=MODULUS_RANGE,
        timeout=opts.timeout,
    )

    def fit_round(grid: Grid, ctx: Context) -> None:
        done = strategy.rounds_done
        if not strategy.start_round(done):
            return  # stopped (privacy budgets): the remaining rounds pass without a message
        secagg(grid, ctx)
        if strategy.rounds_done == done:  # Flower halts a round it cannot unmask, silently
            raise FederationError(
                f"round {done}: secure aggregation halted: more sites dropped out than a "
                f"neighbourhood tolerates (num_shares={plan.num_shares}, reconstruction_"
                f"threshold={plan.threshold}, tolerance {plan.dropout_tolerance}); see the log"
            )

    def no_evaluation(grid: Grid, ctx: Context) -> None:
        """Evaluation runs inside aggregate_fit, over medfed's own exchange."""

    rounds = config.federation.rounds
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
    )
    reporter.start("flower secagg+", total=rounds)
    try:
        DefaultWorkflow(fit_workflow=fit_round, evaluate_workflow=no_evaluation)(grid, legacy)
    finally:
        reporter.stop()
    save_params(strategy.global_params, out_dir / "final.safetensors")
    summary = run_summary(
        strategy.history, config, strategy.config_hash, time.perf_counter() - strategy.t_start
    )
    if strategy.stopped:
        summary["stopped"] = strategy.stopped
    summary["secure_aggregation"] = SECURE_AGGREGATION
    summary["secagg"] = {
        **plan.describe(),
        "max_weight": max_weight,
        "step_scale": step_scale,
        "train_sizes": sizes,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(strategy.history, summary, strategy.global_params)


def secagg_server_app(
    config: RunConfig,
    *,
    out_dir: str | Path,
    num_sites: int,
    options: SecAggOptions | None = None,
    progress: bool = False,
) -> ServerApp:
    """A ServerApp running ``config`` with SecAgg+; the options are checked here, at once."""
    options = options or SecAggOptions()
    check_secagg(config, num_sites, options)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve_secagg(
            grid,
            context,
            config,
            out_dir=out_dir,
            num_sites=num_sites,
            options=options,
            progress=progress,
        )

    return app
