"""SecAgg+ on Flower: the server sees only the weighted sum, and still gets FedAvg's answer."""

from __future__ import annotations

import json
import time

import pytest
import tomllib
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from medfed.algorithms import STRATEGIES
from medfed.algorithms.base import LocalTask
from medfed.cli import main
from medfed.config import build_config
from medfed.engine import FederationError, build_model, load_federation, run
from medfed.runtime.flower.secagg import (
    SecAggOptions,
    check_secagg,
    error_bound,
    options_from_run_config,
    options_to_run_config,
    secagg_client_app,
    secagg_server_app,
    write_secagg_app_dir,
)
from medfed.runtime.inprocess import local_round
from medfed.types import StrategyState


def _config(tmp_path, strategy: str = "fedavg", *extra: str, faults=()):
    """The tiny ultrasound federation of test_flower_simulation.py."""
    return build_config(
        {"faults": list(faults)},
        [
            "data.ultrasound.scale=0.03",
            "data.ultrasound.num_sites=3",
            "data.ultrasound.image_size=32",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.name=medfed:tinycnn",
            "train.batch_size=16",
            "federation.rounds=2",
            "federation.min_clients=3",
            f"federation.strategy.name={strategy}",
            "device=cpu",
            *extra,
        ],
    )


def _max_float_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(
        (a[k].double() - b[k].double()).abs().max().item()
        for k in b
        if b[k].is_floating_point() and b[k].numel()
    )


def _replay(config, fed, start, round_idx, sites):
    """FedAvg's round ``round_idx`` from ``start``, in process, over ``sites`` only."""
    strategy = config.federation.strategy
    algorithm = STRATEGIES.create(strategy.name, strategy.options)
    model = build_model(config, fed)
    updates = []
    for site in fed.sites:
        if site.name in sites:
            task = LocalTask(site.name, round_idx, start, kind=config.task)
            result = local_round(
                algorithm, model, task, site.train, config.train, device=torch.device("cpu"),
                seed=config.seed,
            )  # fmt: skip
            updates.append(result.update)
    return algorithm.aggregate(start, updates, StrategyState(), round_idx=round_idx)[0]


@pytest.mark.slow
def test_secagg_matches_the_in_process_run_within_the_quantisation_error(tmp_path):
    """Round 0 with all three sites, round 1 with site2 dropping out after sharing its keys
    (its masks are rebuilt from its neighbours' shares): both equal FedAvg up to quantisation."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")
    from flwr.simulation import run_simulation

    faults = [{"site": "site2", "kind": "raise", "rounds": [1]}]
    config = _config(tmp_path, "fedavg", "federation.min_clients=2", faults=faults)
    fed, _ = load_federation(config.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Flower's simulation runs each client with one thread
    try:
        ref = run(config, out_dir=tmp_path / "inproc", federation=fed, progress=False)
        out = tmp_path / "secagg"
        app = secagg_server_app(
            config, out_dir=out, num_sites=3, options=SecAggOptions(timeout=120)
        )
        t0 = time.perf_counter()
        run_simulation(
            server_app=app,
            client_app=secagg_client_app,
            num_supernodes=3,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        print(f"SecAgg+ simulation: {time.perf_counter() - t0:.1f} s")
        ours = [
            load_file(str(out / f"checkpoints/round_{r:04d}/global.safetensors")) for r in (0, 1)
        ]
        # Round 1 replayed in process from *our* round 0: isolates round 1's own error.
        replay = _replay(config, fed, ours[0], 1, {"site1", "site3"})
    finally:
        torch.set_num_threads(threads)

    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    opts = summary["secagg"]
    assert summary["secure_aggregation"] == "secagg+" and opts["num_shares"] == 3
    assert opts["max_weight"] == max(len(s.train) for s in fed.sites)  # epochs=1
    examples = {s: v["examples"] for s, v in ref.history.records[0]["sites"].items()}
    # Tolerance, per coordinate and round (see secagg.error_bound): every site sends
    # w_i * x_i with w_i = n_i / max_weight, stochastically rounded to a quantum of
    # 2C/Q = 16 / 2**22 = 3.8e-6 (error < 1 quantum) with w_i itself rounded to 1/(2Q);
    # k sites, divided by sum_i w_i = 143 / 61: 3kC / (Q sum_i w_i) = 7.3e-6 with all three
    # sites; plus float32 rounding of the result and of the reference (2 * 2**-24 * |x|, |x| < 1).
    ref0 = load_file(str(tmp_path / "inproc/checkpoints/round_0000/global.safetensors"))
    for r, (got, want, sites) in enumerate(
        [(ours[0], ref0, set(examples)), (ours[1], replay, {"site1", "site3"})]
    ):
        n = [examples[s] for s in sites]
        tol = error_bound(SecAggOptions(), max_weight=opts["max_weight"], examples=n) + 2**-23
        diff = _max_float_diff(got, want)
        print(f"round {r}: max |param - FedAvg| = {diff:.2e} (bound {tol:.2e})")
        assert diff <= tol, (r, diff, tol)
        assert rows[r]["extra"]["error_bound"] == pytest.approx(tol - 2**-23)
    # End to end against `medfed run`: round 0's error is amplified by round 1's local SGD
    # (3-4 momentum steps from a perturbed start: 1.5e-4 to 2.3e-4 measured, x35 to x60 of
    # round 0's own error), so the whole run agrees to a looser 2e-3.
    final = load_file(str(out / "final.safetensors"))
    assert final.keys() == ref.final_params.keys()
    end_to_end = _max_float_diff(final, ref.final_params)
    print(f"final: max |param - in-process| = {end_to_end:.2e}")
    assert end_to_end <= 2e-3
    assert _max_float_diff(final, ours[1]) == 0.0

    # history.jsonl: medfed's rows, with the dropout recorded and only counts per site
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["participants"] == ["site1", "site2", "site3"] and rows[0]["rejected"] == {}
    assert rows[1]["participants"] == ["site1", "site3"] and list(rows[1]["rejected"]) == ["site2"]
    assert [sorted(r["sites"]) for r in rows] == [sorted(r["sites"]) for r in ref.history]
    for row in rows:
        assert row["extra"]["secure_aggregation"] == "secagg+"
        assert row["extra"]["clipped_share"] < 1e-3
        assert {s: v["examples"] for s, v in row["sites"].items()} == {
            s: examples[s] for s in row["participants"]
        }
        assert set(row["site_val"]) == set(examples) and "auc" in row["val"]
    # the pooled train loss, averaged inside the secure sum, is the example-weighted mean
    ref_sites = ref.history.records[0]["sites"]
    pooled = sum(v["train_loss"] * v["examples"] for v in ref_sites.values()) / sum(
        v["examples"] for v in ref_sites.values()
    )
    assert rows[0]["extra"]["train_loss"] == pytest.approx(pooled, abs=1e-4)
    assert rows[0]["val_auc"] == pytest.approx(ref.history.records[0]["val_auc"], abs=2e-2)
    assert (out / "checkpoints" / "round_0001" / "state.json").is_file()


@pytest.mark.parametrize(
    ("strategy", "needle"),
    [
        ("fedadam", "optimizer step"),
        ("fedyogi", "optimizer step"),
        ("scaffold", "control-variate"),
        ("fedbn", "BatchNorm"),
        ("krum", "robust rule"),
        ("median", "robust rule"),
        ("trimmed_mean", "robust rule"),
    ],
)
def test_strategies_that_need_single_updates_or_server_state_are_refused(
    tmp_path, strategy, needle
):
    config = _config(tmp_path, strategy)
    with pytest.raises(FederationError, match="cannot run under SecAgg\\+") as err:
        secagg_server_app(config, out_dir=tmp_path / "out", num_sites=3)
    assert needle in str(err.value) and "fedavg, fedprox" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_fedavg_and_fedprox_are_accepted(tmp_path):
    for strategy in ("fedavg", "fedprox"):
        plan = check_secagg(_config(tmp_path, strategy), 3)
        assert (plan.num_shares, plan.threshold, plan.dropout_tolerance) == (3, 2, 1)
    plan = check_secagg(
        _config(tmp_path), 7, SecAggOptions(num_shares=0.7, reconstruction_threshold=0.6)
    )
    assert (plan.num_shares, plan.threshold) == (5, 3)  # Flower's rounding: odd, then 0.6 * 5


@pytest.mark.parametrize(
    ("num_sites", "options", "extra", "needle"),
    [
        (2, {}, (), "at least 3 sites, got 2"),
        (3, {"num_shares": 3, "reconstruction_threshold": 4}, (), "must be less than num_shares"),
        (3, {"num_shares": 3, "reconstruction_threshold": 3}, (), "must be less than num_shares"),
        (5, {"num_shares": 5, "reconstruction_threshold": 2}, ("federation.fraction=0.6",),
         "exceeds the 3 sites sampled per round"),
        (4, {}, ("federation.fraction=0.5", "federation.min_clients=2"),
         "at least 3 sites per round"),
        (5, {"num_shares": 4}, (), "must be odd"),
        (3, {"quantization_range": 2**31}, (), "overflow"),
    ],
)  # fmt: skip
def test_secagg_constraints_fail_fast_with_a_clear_message(
    tmp_path, num_sites, options, extra, needle
):
    config = _config(tmp_path, "fedavg", *extra)
    with pytest.raises(FederationError, match=needle):
        secagg_server_app(
            config, out_dir=tmp_path / "out", num_sites=num_sites, options=SecAggOptions(**options)
        )
    assert not (tmp_path / "out").exists()


def test_undetectable_faults_and_bad_options_are_refused(tmp_path):
    faults = [{"site": "site3", "kind": "nan", "rounds": [0]}]
    with pytest.raises(FederationError, match="can be neither detected nor rejected"):
        check_secagg(_config(tmp_path, faults=faults), 3)
    check_secagg(_config(tmp_path, faults=[{"site": "site3", "kind": "drop"}]), 3)  # a dropout
    with pytest.raises(FederationError, match="privacy.he cannot run under SecAgg"):
        check_secagg(_config(tmp_path, "fedavg", "privacy.he={}"), 3)
    with pytest.raises(ValidationError, match="num_shares must be > 2"):
        SecAggOptions(num_shares=2)
    with pytest.raises(ValidationError, match="reconstruction_threshold must be >= 2"):
        SecAggOptions(reconstruction_threshold=1)
    with pytest.raises(ValidationError, match="extra"):
        SecAggOptions(shares=3)  # type: ignore[call-arg]


def test_error_bound_matches_the_quantisation_arithmetic():
    opts = SecAggOptions()
    # 3 sites of 61, 45, 37 examples, max_weight 61: 3 * 3 * 8 / (2**22 * 143 / 61)
    assert error_bound(opts, max_weight=61, examples=[61, 45, 37]) == pytest.approx(
        9 * 8 / (2**22 * 143 / 61)
    )
    finer = SecAggOptions(quantization_range=2**24, clipping_range=4.0)
    assert error_bound(finer, max_weight=61, examples=[61, 45, 37]) == pytest.approx(
        error_bound(opts, max_weight=61, examples=[61, 45, 37]) / 8
    )


def test_deployment_app_names_the_secagg_components_and_declares_its_options(tmp_path):
    app_dir = write_secagg_app_dir(tmp_path / "app")
    doc = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert doc["components"] == {
        "serverapp": "medfed.runtime.flower.secagg:app",
        "clientapp": "medfed.runtime.flower.secagg:secagg_client_app",
    }
    # `flwr run --run-config` refuses keys the App does not declare: every option is declared
    opts = SecAggOptions(num_shares=5, reconstruction_threshold=3, max_weight=500.0, timeout=30)
    rc = options_to_run_config(opts)
    assert set(rc) <= set(doc["config"]) and {"config", "num-sites"} <= set(doc["config"])
    assert options_from_run_config({**rc, "timeout": 30.0}) == opts
    assert options_from_run_config(doc["config"]) == SecAggOptions()  # max-weight 0: derived


def test_cli_secagg_checks_the_federation_before_contacting_the_superlink(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("federation:\n  strategy:\n    name: krum\n")
    argv = ["flower", "run", "c.yaml", "--superlink", "h:1", "--sites", "3", "--insecure"]
    assert main([*argv, "--secagg"]) == 1
    assert "cannot run under SecAgg+" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("federation:\n  strategy:\n    name: fedavg\n")
    assert main([*argv[:-2], "2", "--insecure", "--secagg"]) == 1
    assert "at least 3 sites" in capsys.readouterr().err
    assert main([*argv, "--secagg", "--secagg-threshold", "3"]) == 1
    assert "must be less than num_shares" in capsys.readouterr().err


def _secure_mean(vectors, examples, *, max_weight, opts):
    """What SecAggPlusWorkflow hands aggregate_fit, computed with Flower's own arithmetic
    (the masks cancel exactly in the modular sum, so they are left out)."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        parameters_addition,
        parameters_multiply,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    c, q = opts.clipping_range, opts.quantization_range
    total = None
    for vec, n in zip(vectors, examples, strict=True):
        q_ratio = round(n / max_weight * q)
        quantised = factor_combine(q_ratio, quantize(parameters_multiply(vec, q_ratio / q), c, q))
        total = quantised if total is None else parameters_addition(total, quantised)
    q_total, summed = factor_extract(total)
    aggregated = dequantize(summed, c, q)
    for vec in aggregated:  # exactly as SecAggPlusWorkflow.unmask_stage: in place
        vec += -(len(vectors) - 1) * c
        vec *= q / q_total
    return aggregated


def test_integer_buffers_and_batchnorm_survive_the_secure_mean(tmp_path):
    """BatchNorm statistics average like weights; num_batches_tracked travels as a scaled
    delta and comes back as FedAvg's rounded mean count."""
    from medfed.algorithms.aggregate import fedavg_aggregate
    from medfed.algorithms.base import read_params
    from medfed.build import model_for_shape
    from medfed.progress import Reporter
    from medfed.runtime.flower.secagg import SecAggFedAvg, upload_vector
    from medfed.types import ParamKind, Update

    config = _config(tmp_path, "fedavg", "model.name=medfed:smallcnn")
    model = model_for_shape(config, num_classes=2, in_chans=1, image_size=32)
    start = read_params(model)
    keys = list(start)
    examples, steps = [61, 45, 37], [4, 3, 3]
    gen = torch.Generator().manual_seed(0)
    updates = []
    for i, (n, s) in enumerate(zip(examples, steps, strict=True)):
        params = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + s
            for k, v in start.items()
        }
        updates.append(Update(f"site{i + 1}", params, ParamKind.WEIGHTS, n, {"train_loss": 0.5}))
    opts = SecAggOptions()
    max_weight, step_scale = 61.0, 4.0
    vectors = [
        upload_vector(u.params, start, keys, train_loss=0.5, step_scale=step_scale) for u in updates
    ]
    mean = _secure_mean(vectors, examples, max_weight=max_weight, opts=opts)
    strategy = SecAggFedAvg(
        config=config, plan=check_secagg(config, 3, opts), nodes={"site1": 1, "site2": 2, "site3": 3},
        initial=start, max_weight=max_weight, step_scale=step_scale,
        evaluate=lambda r, p: None, out_dir=tmp_path, reporter=Reporter(enabled=False),
    )  # fmt: skip
    ours = strategy._unpack(mean[:-1])
    want = fedavg_aggregate(start, updates, None)
    assert [ours[k].dtype for k in keys] == [want[k].dtype for k in keys]
    tol = error_bound(opts, max_weight=max_weight, examples=examples) + 2**-23
    assert _max_float_diff(ours, want) <= tol
    for k in keys:
        if not want[k].is_floating_point():
            assert torch.equal(ours[k], want[k]), k  # 0 + round((4*61 + 3*45 + 3*37) / 143)
    assert mean[-1][0] == pytest.approx(0.5, abs=tol)  # the pooled train loss
    assert abs(mean[-1][1]) < tol  # nobody clipped
