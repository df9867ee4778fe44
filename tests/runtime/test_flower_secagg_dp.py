"""Differential privacy under SecAgg+: noise at the site before masking, ε booked by the server."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.app import Context
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from scipy import stats

from medfed.algorithms.base import FederationContext, LocalTask
from medfed.config import RunConfig
from medfed.data.site import Federation
from medfed.engine import FederationError, RunResult, build_model, load_federation, run
from medfed.privacy.dp import sample_rate, steps_per_round
from medfed.privacy.run import RoundPrivacy, create_algorithm
from medfed.progress import Reporter
from medfed.runtime.flower.secagg import (
    SecAggFedAvg,
    SecAggOptions,
    check_secagg,
    error_bound,
    secagg_client_app,
    secagg_server_app,
    serve_secagg,
)
from medfed.runtime.flower.secagg.plan import (
    NOISE_OVERFLOW,
    POISSON_OVERFLOW,
    check_dp_clipping,
    dp_clipping_range,
    max_examples,
    round_shares_problem,
)
from medfed.runtime.inprocess import local_round
from medfed.types import Params, StrategyState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_flower_secagg import _config, _max_float_diff  # noqa: E402

DELTA = 1e-5


def _opacus(events: list[tuple[float, float, int]]) -> float:
    """Opacus' RDP accountant stepped as its own optimizer hook steps it."""
    acc = RDPAccountant()
    for z, q, steps in events:
        for _ in range(steps):
            acc.step(noise_multiplier=z, sample_rate=q)
    return float(acc.get_epsilon(DELTA))


def _local(tmp_path, *extra: str):
    return _config(
        tmp_path,
        "fedavg",
        "privacy.dp.mode=local",
        "privacy.dp.noise_multiplier=2.0",
        "privacy.dp.clip=0.05",
        *extra,
    )


def _simulate(runs: list[tuple[RunConfig, Path]]) -> None:
    """Several medfed SecAgg+ runs, one after the other, in one simulation: Ray's start-up
    (~30 s of a ~40 s simulation on 2 cores) is paid once."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    for config, _ in runs:
        check_secagg(config, 3)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for config, out in runs:
            opts = SecAggOptions(timeout=120)
            serve_secagg(grid, context, config, out_dir=out, num_sites=3, options=opts)

    run_simulation(
        server_app=app,
        client_app=secagg_client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


# --- planning: what is allowed, and the bounds (no Flower run) ---


def test_central_dp_is_refused_local_and_dpsgd_are_accepted(tmp_path):
    central = _config(
        tmp_path, "fedavg", "privacy.dp.mode=central", "privacy.dp.noise_multiplier=1"
    )
    with pytest.raises(FederationError, match="mode central cannot run under SecAgg") as err:
        secagg_server_app(central, out_dir=tmp_path / "out", num_sites=3)
    assert "distributed noise" in str(err.value) and "local" in str(err.value)
    assert not (tmp_path / "out").exists()
    for mode in ("local", "dpsgd"):
        cfg = _config(
            tmp_path, "fedavg", f"privacy.dp.mode={mode}", "privacy.dp.noise_multiplier=1"
        )
        assert check_secagg(cfg, 3).num_shares == 3


def test_dp_clipping_range_holds_the_weights_and_the_noise_tail(tmp_path):
    config = _local(tmp_path)  # σC = 2 * 0.05 = 0.1
    initial = {
        "w": torch.tensor([[0.5, -1.5], [0.25, 0.0]]),
        "b": torch.zeros(6),
        "n": torch.tensor(7),  # an integer buffer: neither noised nor counted
    }
    # d = 10 noised values; the union bound 10 * P(|N(0,1)| > z) = 1e-6 gives z = Φ⁻¹(1 - 5e-8)
    z = stats.norm.isf(NOISE_OVERFLOW / 20)
    assert dp_clipping_range(config, initial) == pytest.approx(1.5 + 0.1 * z, rel=1e-9)
    assert 10 * 2 * stats.norm.sf(z) == pytest.approx(NOISE_OVERFLOW)
    assert dp_clipping_range(_config(tmp_path), initial) is None  # no DP: nothing to add
    dpsgd = _config(tmp_path, "fedavg", "privacy.dp.mode=dpsgd", "privacy.dp.noise_multiplier=5")
    assert dp_clipping_range(dpsgd, initial) is None  # noise on gradients, not on the upload
    check_dp_clipping(config, SecAggOptions(), initial)  # 8 >> 1.5 + 0.55
    loud = _local(tmp_path, "privacy.dp.clip=1.0")  # σC = 2 with 1.5 already used
    with pytest.raises(FederationError, match="Raise clipping_range to at least 13 "):
        check_dp_clipping(loud, SecAggOptions(), initial)
    check_dp_clipping(loud, SecAggOptions(clipping_range=13.0), initial)


def test_dpsgd_max_weight_covers_the_poisson_batches():
    from medfed.client.train import TrainOptions

    opts = TrainOptions(batch_size=16)
    # 61 images: q = 1/4, 4 steps, so the examples seen are Binomial(244, 1/4), mean 61
    bound = max_examples(61, opts, poisson=True)
    assert (sample_rate(61, opts), steps_per_round(61, opts)) == (0.25, 4)
    assert (
        stats.binom.sf(bound, 244, 0.25) <= POISSON_OVERFLOW < stats.binom.sf(bound - 1, 244, 0.25)
    )
    assert 61 < bound < 244
    assert max_examples(61, opts) == 61  # shuffled batches: one pass exactly


def test_round_shares_problem_names_what_no_longer_fits(tmp_path):
    plan = check_secagg(_config(tmp_path), 5, SecAggOptions(num_shares=5))
    assert round_shares_problem(plan, 5) is None
    assert "num_shares=5" in str(round_shares_problem(plan, 4))
    assert "at least 3 sites" in str(round_shares_problem(plan, 2))
    fraction = check_secagg(_config(tmp_path), 5, SecAggOptions(num_shares=1.0))
    assert round_shares_problem(fraction, 4) is None and round_shares_problem(fraction, 3) is None


def test_budget_admission_stops_the_secure_round_loop(tmp_path):
    """The strategy alone (no Flower): a spent budget ends the run before any site is asked."""
    config = _local(tmp_path, "privacy.dp.max_epsilon=3.5", "federation.rounds=5")
    sites = ("site1", "site2", "site3")
    algorithm = create_algorithm(config, num_sites=3)
    privacy = RoundPrivacy.for_run(config, algorithm, sites)
    assert privacy is not None
    initial = {"w": torch.zeros(3)}
    strategy = SecAggFedAvg(
        config=config, plan=check_secagg(config, 3), nodes={s: i for i, s in enumerate(sites)},
        initial=initial, max_weight=10.0, step_scale=1.0, evaluate=lambda r, p: None,
        out_dir=tmp_path, reporter=Reporter(enabled=False), privacy=privacy,
        train_sizes=dict.fromkeys(sites, 10),
    )  # fmt: skip
    for r in range(2):  # ε(2, 1, 1) = 2.17 and ε(2, 1, 2) = 3.19 fit under 3.5
        assert strategy.start_round(r) and strategy.current is not None
        assert strategy.current.participants == sites and strategy.current.refused == {}
        spent = privacy.record_events(
            {s: privacy.planned_event(10, config.train) for s in sites}, StrategyState()
        )
        assert spent["epsilon"]["site2"] == pytest.approx(_opacus([(2.0, 1.0, r + 1)]), rel=1e-9)
    assert not strategy.start_round(2)  # ε(2, 1, 3) = 4.01 > 3.5: nobody may take part
    assert strategy.stopped is not None
    assert strategy.stopped.startswith("round 2: privacy budget exhausted")
    assert not strategy.start_round(3)  # stays stopped


@pytest.mark.parametrize(
    ("num_sites", "min_clients", "stops"),
    [(4, 3, None), (3, 2, "SecAgg+ needs at least 3 sites per round, 2 remain")],
)
def test_a_spent_site_is_left_out_while_the_round_stays_secure(
    tmp_path, num_sites, min_clients, stops
):
    """site1 has spent two rounds, the others none: only site1 is refused (ε would reach 4.01 >
    3.5); the round goes on without it unless fewer than 3 sites would be left to mask."""
    config = _local(tmp_path, "privacy.dp.max_epsilon=3.5", f"federation.min_clients={min_clients}")
    sites = tuple(f"site{i + 1}" for i in range(num_sites))
    privacy = RoundPrivacy.for_run(config, create_algorithm(config, num_sites=num_sites), sites)
    assert privacy is not None
    for _ in range(2):
        privacy.record_events({"site1": (2.0, 1.0, 1)}, StrategyState())
    strategy = SecAggFedAvg(
        config=config, plan=check_secagg(config, num_sites), nodes={s: i for i, s in enumerate(sites)},
        initial={"w": torch.zeros(3)}, max_weight=10.0, step_scale=1.0, evaluate=lambda r, p: None,
        out_dir=tmp_path, reporter=Reporter(enabled=False), privacy=privacy,
        train_sizes=dict.fromkeys(sites, 10),
    )  # fmt: skip
    assert strategy.start_round(2) is (stops is None)
    if stops is None:
        assert strategy.current is not None
        assert strategy.current.participants == sites[1:]
        assert list(strategy.current.refused) == ["site1"]
        assert "ε=3.19 so far" in strategy.current.refused["site1"]
    else:
        assert strategy.stopped is not None and stops in strategy.stopped
        assert "site1: privacy budget spent" in strategy.stopped


@pytest.mark.parametrize(
    "dp",
    [
        # dpsgd: sample rate and steps from the site's size (calibrating σ from it as well
        # would be the same function, site_noise, at ~3 s per Opacus search on 2 cores)
        ("privacy.dp.mode=dpsgd", "privacy.dp.noise_multiplier=1.3"),
        ("privacy.dp.mode=local", "privacy.dp.target_epsilon=4"),  # σ calibrated from rounds
    ],
)
def test_the_server_derives_the_event_each_site_reports(tmp_path, dp):
    """What the SecAgg+ server books for a site (from the config and its training-set size)
    is what the site's own wrapper reports with its update in process."""
    from medfed.privacy.dp import event_of

    config = _config(tmp_path, "fedavg", *dp, "train.max_steps=2")
    fed, _ = load_federation(config.data)
    site = fed.sites[1]
    model = build_model(config, fed)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    names = tuple(s.name for s in fed.sites)
    server = RoundPrivacy.for_run(config, create_algorithm(config, num_sites=3), names)
    assert server is not None
    task = LocalTask(site.name, 0, start, kind=config.task)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = local_round(
            create_algorithm(config, num_sites=1), model, task, site.train, config.train,
            device=torch.device("cpu"), seed=config.seed,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert server.planned_event(len(site.train), config.train) == event_of(result.update)


def test_the_secagg_site_keeps_its_own_accountant_and_refuses_to_overspend(tmp_path):
    """The site's ledger of what it spent lives in its node's Context between rounds, so it
    refuses a round past max_epsilon even if a server asks for one (as in process)."""
    from flwr.app import RecordDict

    from medfed.privacy.dp import BudgetExhausted
    from medfed.runtime.flower.codec import Field
    from medfed.runtime.flower.secagg import SecAggSiteClient

    config = _local(tmp_path, "privacy.dp.max_epsilon=2.5", "federation.rounds=3")  # one round
    fed, _ = load_federation(config.data)
    start = {k: v.clone() for k, v in build_model(config, fed).state_dict().items()}
    keys = list(start)
    context = Context(1, 7, {"partition-id": 0}, RecordDict(), {})
    client = SecAggSiteClient(context)

    def fit(r: int):
        return client.fit(
            [start[k].numpy() for k in keys],
            {
                Field.CONFIG: config.model_dump_json(),
                Field.ROUND: r,
                Field.SECAGG_KEYS: json.dumps(keys),
                Field.SECAGG_MAX_WEIGHT: 1000.0,
                Field.SECAGG_STEP_SCALE: 10.0,
                Field.SECAGG_CLIPPING_RANGE: 8.0,
                Field.SECAGG_QUANTIZATION_RANGE: 2**22,
            },
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vector, n, metrics = fit(0)  # ε(2, 1, 1) = 2.17 <= 2.5
        assert n == len(fed.sites[0].train) and metrics == {}  # only the count in the clear
        assert len(vector) == len(keys) + 1
        with pytest.raises(BudgetExhausted, match="site 'site1'.*budget exhausted"):
            fit(1)  # ε(2, 1, 2) = 3.19 > 2.5: this site's own accountant says no
    finally:
        torch.set_num_threads(threads)


# --- end to end on Flower's simulation engine ---


def _replay_private(config, fed, start, round_idx):
    """A DP FedAvg round from ``start``, in process, with the sites' seeded noise."""
    algorithm = create_algorithm(config, num_sites=len(fed.sites))
    model = build_model(config, fed)
    names = tuple(s.name for s in fed.sites)
    state = algorithm.init(start, context=FederationContext(model=model, sites=names))
    updates = []
    for site in fed.sites:
        task = LocalTask(site.name, round_idx, start, kind=config.task)
        result = local_round(
            algorithm, model, task, site.train, config.train, device=torch.device("cpu"),
            seed=config.seed,
        )  # fmt: skip
        updates.append(result.update)
    return algorithm.aggregate(start, updates, state, round_idx=round_idx)[0]


@dataclass(frozen=True)
class _Runs:
    fed: Federation
    local: RunConfig  # σ = 2, C = 0.05, ε ≤ 3.5: two of three rounds fit
    dpsgd: RunConfig  # σ = 1.1, C = 1, one round
    local_ref: RunResult  # the same configs in process
    dpsgd_ref: RunResult
    local_out: Path  # the SecAgg+ runs' folders
    dpsgd_out: Path
    replay: Params  # local round 1, in process, from the SecAgg+ run's round 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> _Runs:
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")
    tmp = tmp_path_factory.mktemp("secagg_dp")
    local = _local(tmp, "privacy.dp.max_epsilon=3.5", "federation.rounds=3")
    dpsgd = _config(
        tmp,
        "fedavg",
        "privacy.dp.mode=dpsgd",
        "privacy.dp.noise_multiplier=1.1",
        "privacy.dp.clip=1.0",
        "federation.rounds=1",
    )
    fed, _ = load_federation(local.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Flower's simulation runs each client with one thread
    try:
        local_ref = run(local, out_dir=tmp / "local-inproc", federation=fed, progress=False)
        dpsgd_ref = run(dpsgd, out_dir=tmp / "dpsgd-inproc", federation=fed, progress=False)
        _simulate([(local, tmp / "local"), (dpsgd, tmp / "dpsgd")])
        start = load_file(str(tmp / "local/checkpoints/round_0000/global.safetensors"))
        replay = _replay_private(local, fed, start, 1)
    finally:
        torch.set_num_threads(threads)
    return _Runs(fed, local, dpsgd, local_ref, dpsgd_ref, tmp / "local", tmp / "dpsgd", replay)


@pytest.mark.slow
def test_local_dp_under_secagg_matches_in_process_and_stops_on_budget(runs):
    """The same seeded site noise in both runtimes, so SecAgg+ equals the in-process DP run up
    to quantisation; ε per site per round is Opacus' for that many full-data Gaussian rounds;
    the third round is refused by the budget, as in process."""
    out, ref, config = runs.local_out, runs.local_ref, runs.local
    rows, summary = _rows(out), json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in rows] == [0, 1] and summary["rounds"] == 2
    assert summary["stopped"].startswith("round 2: privacy budget exhausted")
    assert ref.summary["stopped"] == summary["stopped"]
    examples = {s: v["examples"] for s, v in rows[0]["sites"].items()}
    ours = [load_file(str(out / f"checkpoints/round_{r:04d}/global.safetensors")) for r in (0, 1)]
    ref0 = load_file(str(out.parent / "local-inproc/checkpoints/round_0000/global.safetensors"))
    max_weight = summary["secagg"]["max_weight"]
    # per coordinate: the quantisation bound (see error_bound) plus float32 rounding of |x| < 1
    tol = error_bound(SecAggOptions(), max_weight=max_weight, examples=[*examples.values()])
    for r, (got, want) in enumerate([(ours[0], ref0), (ours[1], runs.replay)]):
        diff = _max_float_diff(got, want)
        assert diff <= tol + 2**-23, (r, diff, tol)
        assert rows[r]["extra"]["clipped_share"] < 1e-3  # the noise fits the default range
    # the site noise really is in there: σC = 0.1 per coordinate, averaged over 3 sites
    initial = build_model(config, runs.fed).state_dict()
    assert _max_float_diff(ours[0], dict(initial)) > 0.1
    for r, (row, want_row) in enumerate(zip(rows, ref.history, strict=True)):
        assert row["privacy"]["mode"] == "local" and row["privacy"]["delta"] == DELTA
        assert row["privacy"]["noise_multiplier"] == dict.fromkeys(examples, 2.0)
        for site in examples:
            eps = row["privacy"]["epsilon"][site]
            assert eps == pytest.approx(_opacus([(2.0, 1.0, r + 1)]), rel=1e-9)
            assert eps == pytest.approx(want_row["privacy"]["epsilon"][site], rel=1e-12)
    assert summary["privacy"] == rows[-1]["privacy"]
    state = json.loads((out / "checkpoints/round_0001/state.json").read_text())
    assert state["privacy"]["history"] == {s: [[2.0, 1.0, 2]] for s in examples}
    # the meta is RoundPrivacy's own: restoring it gives back the ε the run had spent
    restored = RoundPrivacy.for_run(config, create_algorithm(config, num_sites=3), [*examples])
    assert restored is not None
    restored.restore(state["privacy"])
    assert restored.spend.epsilons(examples) == pytest.approx(rows[-1]["privacy"]["epsilon"])


@pytest.mark.slow
def test_dpsgd_under_secagg_books_the_in_process_epsilon(runs):
    out, config, fed = runs.dpsgd_out, runs.dpsgd, runs.fed
    rows, summary = _rows(out), json.loads((out / "summary.json").read_text())
    assert len(rows) == 1 and "stopped" not in summary
    assert rows[0]["participants"] == [s.name for s in fed.sites] and rows[0]["rejected"] == {}
    want = runs.dpsgd_ref.history.records[0]["privacy"]
    for site in fed.sites:
        n = len(site.train)
        eps = _opacus([(1.1, sample_rate(n, config.train), steps_per_round(n, config.train))])
        assert rows[0]["privacy"]["epsilon"][site.name] == pytest.approx(eps, rel=1e-9)
        assert rows[0]["privacy"]["epsilon"][site.name] == pytest.approx(
            want["epsilon"][site.name], rel=1e-12
        )
    assert rows[0]["privacy"]["mode"] == "dpsgd" and summary["privacy"] == rows[0]["privacy"]
    # max_weight covers the Poisson batches (a site above it would have dropped out)
    bound = max(max_examples(len(s.train), config.train, poisson=True) for s in fed.sites)
    assert summary["secagg"]["max_weight"] == bound
    final = load_file(str(out / "final.safetensors"))
    assert final.keys() == runs.dpsgd_ref.final_params.keys()
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
