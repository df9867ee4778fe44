"""Differential privacy: clipping, noise, accounting (against Opacus), DP-SGD, budgets, resume."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy import stats

from medfed.client.train import SampleDP, TrainOptions, train_local
from medfed.config import ConfigError, build_config
from medfed.engine import run
from medfed.models.factory import create_model
from medfed.privacy.accounting import AccountantKind, PrivacySpend, calibrate, epsilon
from medfed.privacy.config import AdaptiveClipping
from medfed.privacy.dp import adapt_clip, make_private_model, sample_rate, steps_per_round
from medfed.privacy.transforms import (
    ClipL2,
    GaussianNoise,
    TransformContext,
    chain,
    clip_by_l2,
    delta_of,
    l2_norm,
)
from medfed.progress import Reporter
from medfed.types import ParamKind, Update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_federation  # noqa: E402


def _opacus(kind: str, events: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' accountant driven step by step, as Opacus' own optimizer hook drives it."""
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for z, q, steps in events:
        for _ in range(steps):
            acc.step(noise_multiplier=z, sample_rate=q)
    return float(acc.get_epsilon(delta))


# --- accounting ---


@settings(max_examples=25, deadline=None)
@given(
    z=st.floats(0.5, 4.0),
    q=st.floats(0.001, 1.0),
    steps=st.integers(1, 300),
    z2=st.floats(0.5, 4.0),
    steps2=st.integers(1, 50),
)
def test_epsilon_equals_opacus_rdp_for_random_histories(z, q, steps, z2, steps2):
    spend = PrivacySpend(delta=1e-5, kind=AccountantKind.RDP)
    spend.record("a", (z, q, steps))
    spend.record("a", (z2, q, steps2))
    ours = spend.epsilon("a")
    ref = _opacus("rdp", [(z, q, steps), (z2, q, steps2)], 1e-5)
    assert ours == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize(("z", "q", "steps"), [(1.0, 0.05, 200), (1.3, 0.01, 1000), (2.0, 0.2, 30)])
def test_epsilon_equals_opacus_prv(z, q, steps):
    ours = epsilon([(z, q, steps)], delta=1e-5, kind=AccountantKind.PRV)
    assert ours == pytest.approx(_opacus("prv", [(z, q, steps)], 1e-5), rel=1e-6)


def test_epsilon_edge_cases():
    assert epsilon([], delta=1e-5, kind=AccountantKind.RDP) == 0.0
    assert math.isinf(epsilon([(0.0, 1.0, 1)], delta=1e-5, kind=AccountantKind.RDP))


def test_calibration_hits_the_target_from_below():
    z = calibrate(
        target_epsilon=8.0, delta=1e-5, sample_rate=0.05, steps=400, kind=AccountantKind.RDP
    )
    eps = _opacus("rdp", [(z, 0.05, 400)], 1e-5)
    assert 7.8 <= eps <= 8.0


def test_spend_round_trips_through_json():
    spend = PrivacySpend(delta=1e-6, kind=AccountantKind.PRV)
    spend.record("a", (1.0, 0.1, 5))
    spend.record("a", (1.0, 0.1, 5))  # merged: same mechanism
    spend.record("b", (2.0, 1.0, 1))
    back = PrivacySpend.from_json(spend.to_json())
    assert back.history == {"a": [(1.0, 0.1, 10)], "b": [(2.0, 1.0, 1)]}
    assert back.kind is AccountantKind.PRV and back.delta == 1e-6


# --- transforms ---


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    scale=st.floats(1e-3, 1e3),
    clip=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_clipping_never_exceeds_the_bound(shapes, scale, clip, seed):
    g = torch.Generator().manual_seed(seed)
    delta = {f"t{i}": torch.randn(n, generator=g) * scale for i, n in enumerate(shapes)}
    clipped, norm = clip_by_l2(delta, clip)
    assert l2_norm(clipped) <= clip
    assert norm == pytest.approx(l2_norm(delta), rel=1e-6)
    if norm <= clip:  # short updates pass unchanged
        for k in delta:
            assert torch.equal(clipped[k], delta[k])
    else:  # long ones keep their direction
        flat = torch.cat([clipped[k] for k in sorted(delta)])
        ref = torch.cat([delta[k] for k in sorted(delta)])
        cos = torch.nn.functional.cosine_similarity(flat.double(), ref.double(), dim=0)
        assert cos > 1 - 1e-6


def _update(params, kind=ParamKind.WEIGHTS):
    return Update(site="s", params=params, kind=kind, num_examples=3)


def test_clip_works_on_the_change_not_the_weights():
    glob = {"w": torch.tensor([10.0, 10.0]), "n": torch.tensor(7)}
    up = _update({"w": torch.tensor([13.0, 14.0]), "n": torch.tensor(9)})
    ctx = TransformContext(glob, torch.Generator().manual_seed(0))
    out = ClipL2(1.0)(up, ctx)
    assert torch.allclose(out.params["w"], torch.tensor([10.6, 10.8]), atol=1e-5)
    assert torch.equal(out.params["n"], torch.tensor(9))  # integer buffers are not touched
    assert out.metrics["dp_norm"] == pytest.approx(5.0)
    assert out.metrics["dp_unclipped"] == 0.0
    # A DELTA update is the change itself.
    d = ClipL2(1.0)(_update({"w": torch.tensor([3.0, 4.0])}, ParamKind.DELTA), ctx)
    assert torch.allclose(d.params["w"], torch.tensor([0.6, 0.8]), atol=1e-5)


def test_noise_has_the_stated_standard_deviation():
    """Chi-square test on 200k draws: std within the 99.9% interval, mean ~ 0, reproducible."""
    glob = {"w": torch.zeros(200_000, dtype=torch.float64)}
    up = _update({"w": torch.zeros(200_000, dtype=torch.float64)})
    std = 0.37
    out = GaussianNoise(std)(up, TransformContext(glob, torch.Generator().manual_seed(1)))
    x = out.params["w"].numpy()
    n = x.size
    stat = float((x**2).sum() / std**2)
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], df=n)
    assert lo < stat < hi
    assert abs(x.mean()) < 4 * std / math.sqrt(n)
    assert stats.kstest(x / std, "norm").pvalue > 1e-3
    again = GaussianNoise(std)(up, TransformContext(glob, torch.Generator().manual_seed(1)))
    assert torch.equal(again.params["w"], out.params["w"])


def test_chain_applies_clip_then_noise():
    glob = {"w": torch.zeros(4)}
    up = _update({"w": torch.tensor([30.0, 40.0, 0.0, 0.0])})
    ctx = TransformContext(glob, torch.Generator().manual_seed(0))
    out = chain(ClipL2(2.0), GaussianNoise(0.0))(up, ctx)
    assert l2_norm(delta_of(out, glob)) == pytest.approx(2.0, rel=1e-5)


def test_adaptive_clip_moves_geometrically_toward_the_quantile():
    cfg = AdaptiveClipping(target_quantile=0.5, lr=0.2)
    g = torch.Generator().manual_seed(0)
    # Every update fits under C: C shrinks by exp(-0.2 * 0.5) (count noise negligible here).
    down = adapt_clip(1.0, [1.0] * 10, cfg, count_stddev=1e-9, generator=g)
    assert down == pytest.approx(math.exp(-0.1), rel=1e-6)
    up = adapt_clip(1.0, [0.0] * 10, cfg, count_stddev=1e-9, generator=g)
    assert up == pytest.approx(math.exp(0.1), rel=1e-6)


# --- DP-SGD at a site ---


def test_private_model_has_no_batchnorm_and_no_inplace_ops():
    model = make_private_model(
        create_model("medfed:smallcnn", num_classes=2, in_chans=1, image_size=16)
    )
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_dpsgd_step_is_bounded_by_the_per_example_clip_and_leaves_a_plain_model():
    """σ = 0, one SGD step: the mean of clipped per-example gradients has norm ≤ C·|B|/E|B|."""
    torch.manual_seed(0)
    data = make_federation(1, n=64).sites[0].train
    model = make_private_model(
        create_model("medfed:smallcnn", num_classes=2, in_chans=1, image_size=16)
    )
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = TrainOptions(
        batch_size=16, lr=1.0, momentum=0.0, max_steps=1, augment=False, normalize="fixed"
    )
    clip = 1e-3
    res = train_local(
        model,
        data,
        opts,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        dp=SampleDP(noise_multiplier=0.0, max_grad_norm=clip),
    )
    after = model.state_dict()
    assert list(after) == keys  # the unwrapped module's names: no "_module." prefix
    step = math.sqrt(sum(float((after[k] - before[k]).double().pow(2).sum()) for k in keys))
    expected_batch = len(data) * sample_rate(len(data), opts)
    assert 0 < step <= opts.lr * clip * res.num_examples / expected_batch * (1 + 1e-5)
    assert res.num_steps == 1
    # Opacus' hooks are gone: a plain backward leaves no per-example gradients behind.
    model(torch.zeros(2, 1, 16, 16)).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_dpsgd_refuses_a_loss_term():
    data = make_federation(1, n=16).sites[0].train
    model = make_private_model(
        create_model("medfed:smallcnn", num_classes=2, in_chans=1, image_size=16)
    )
    with pytest.raises(ValueError, match="bypass the clip"):
        train_local(
            model,
            data,
            TrainOptions(batch_size=8),
            generator=torch.Generator().manual_seed(0),
            device=torch.device("cpu"),
            loss_term=lambda m: torch.zeros(()),
            dp=SampleDP(noise_multiplier=1.0, max_grad_norm=1.0),
        )


# --- runs ---


def cfg(*sets: str, rounds: int = 3, dp: dict | None = None):
    raw = {
        "device": "cpu",
        "model": {"name": "medfed:smallcnn"},
        "federation": {"rounds": rounds, "min_clients": 2},
        "train": {"batch_size": 16, "lr": 0.05, "momentum": 0.0},
        "privacy": {"dp": dp} if dp else {},
    }
    return build_config(raw, list(sets))


@pytest.fixture(scope="module")
def fed():
    return make_federation(3, n=48)


def test_dpsgd_run_records_opacus_epsilon_per_site(tmp_path, fed):
    c = cfg(dp={"mode": "dpsgd", "noise_multiplier": 1.1, "clip": 1.0}, rounds=2)
    res = run(c, out_dir=tmp_path, federation=fed, progress=False)
    rows = list(res.history)
    for site in fed.sites:
        n = len(site.train)
        q, steps = sample_rate(n, c.train), steps_per_round(n, c.train)
        for r, row in enumerate(rows):
            ref = _opacus("rdp", [(1.1, q, steps * (r + 1))], 1e-5)
            assert row["privacy"]["epsilon"][site.name] == pytest.approx(ref, rel=1e-9)
    assert res.summary["privacy"]["max_epsilon"] == pytest.approx(
        max(rows[-1]["privacy"]["epsilon"].values())
    )
    line = (tmp_path / "history.jsonl").read_text().splitlines()[-1]
    assert '"privacy"' in line and '"epsilon"' in line


@pytest.mark.parametrize("mode", ["local", "central"])
def test_target_epsilon_is_reached_not_exceeded(tmp_path, fed, mode):
    c = cfg(dp={"mode": mode, "target_epsilon": 6.0, "clip": 0.5}, rounds=3)
    res = run(c, out_dir=tmp_path, federation=fed, progress=False)
    eps = res.summary["privacy"]["epsilon"]
    assert set(eps) == {s.name for s in fed.sites}
    for value in eps.values():
        assert 5.8 <= value <= 6.0
    assert "stopped" not in res.summary


def test_central_noise_on_the_mean_has_std_sigma_c_over_m(fed):
    """Identical updates: the aggregate differs from them by N(0, (σC/m)²) noise only."""
    from medfed.algorithms import STRATEGIES, FederationContext
    from medfed.privacy.config import DPConfig
    from medfed.privacy.dp import PrivateAlgorithm, Schedule

    model = make_private_model(
        create_model("medfed:smallcnn", num_classes=2, in_chans=1, image_size=16)
    )
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DPConfig(mode="central", noise_multiplier=2.0, clip=0.5)
    algo = PrivateAlgorithm(
        STRATEGIES.create("fedavg", {}), dp, schedule=Schedule(3, 1.0, 4), seed=0
    )
    state = algo.init(glob, context=FederationContext(model=model, sites=("a", "b", "c", "d")))
    ups = [Update(s, dict(glob), ParamKind.WEIGHTS, 10 * (i + 1)) for i, s in enumerate("abcd")]
    new, _ = algo.aggregate(glob, ups, state, round_idx=0)
    noise = torch.cat([(new[k] - glob[k]).flatten() for k in glob if glob[k].is_floating_point()])
    n = noise.numel()
    std = 2.0 * 0.5 / 4
    stat = float((noise.double() ** 2).sum() / std**2)
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], df=n)
    assert lo < stat < hi


def test_budget_exhaustion_stops_participation_with_a_message(tmp_path, fed):
    # Local mode, σ = 2: Opacus says how many rounds fit under ε = 3.
    z, budget = 2.0, 3.0
    fit = max(k for k in range(1, 20) if _opacus("rdp", [(z, 1.0, k)], 1e-5) <= budget)
    c = cfg(dp={"mode": "local", "noise_multiplier": z, "max_epsilon": budget}, rounds=fit + 3)
    res = run(c, out_dir=tmp_path, federation=fed, progress=False)
    assert res.summary["rounds"] == fit
    assert "privacy budget" in res.summary["stopped"]
    assert all(e <= budget for e in res.summary["privacy"]["epsilon"].values())


def test_site_refuses_to_overspend_even_if_asked(fed):
    from medfed.algorithms import STRATEGIES
    from medfed.algorithms.base import LocalTask
    from medfed.privacy.config import DPConfig
    from medfed.privacy.dp import BudgetExhausted, PrivateAlgorithm, Schedule

    dp = DPConfig(mode="local", noise_multiplier=1.0, max_epsilon=1.0)
    algo = PrivateAlgorithm(STRATEGIES.create("fedavg", {}), dp, schedule=Schedule(5, 1, 3), seed=0)
    model = make_private_model(
        create_model("medfed:smallcnn", num_classes=2, in_chans=1, image_size=16)
    )
    task = LocalTask(site="site0", round_idx=0, global_params=dict(model.state_dict()))
    with pytest.raises(BudgetExhausted, match="site 'site0'.*budget"):
        algo.local_update(
            model,
            task,
            fed.sites[0].train,
            TrainOptions(batch_size=16),
            generator=torch.Generator().manual_seed(0),
            device=torch.device("cpu"),
        )


def test_dp_run_resumes_bit_identical_with_its_privacy_spend(tmp_path, fed, monkeypatch):
    c = cfg(dp={"mode": "local", "noise_multiplier": 1.5, "clip": 0.5}, rounds=3)
    whole = run(c, out_dir=tmp_path / "whole", federation=fed, progress=False)
    original = Reporter.round_done

    def crash(self, rec):
        original(self, rec)
        if rec.round == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Reporter, "round_done", crash)
    with pytest.raises(KeyboardInterrupt):
        run(c, out_dir=tmp_path / "cut", federation=fed, progress=False)
    monkeypatch.setattr(Reporter, "round_done", original)
    resumed = run(c, out_dir=tmp_path / "cut", resume=True, federation=fed, progress=False)
    for k, v in whole.final_params.items():
        assert torch.equal(v, resumed.final_params[k]), k
    assert resumed.summary["privacy"] == whole.summary["privacy"]


def test_local_noise_really_reaches_the_update(tmp_path, fed):
    """Same seed with and without DP: the model differs, and ε is reported only with DP."""
    plain = run(cfg(rounds=1), out_dir=tmp_path / "p", federation=fed, progress=False)
    noisy = run(
        cfg(dp={"mode": "local", "noise_multiplier": 1.0}, rounds=1),
        out_dir=tmp_path / "n",
        federation=fed,
        progress=False,
    )
    assert plain.summary["privacy"] is None
    assert noisy.summary["privacy"]["mode"] == "local"
    a = next(v for k, v in noisy.final_params.items() if v.is_floating_point())
    assert np.isfinite(a.numpy()).all()


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["federation.strategy.name=scaffold"], "control variates"),
        (["federation.strategy.name=median", "privacy.dp.mode=central"], "not one"),
        (["privacy.dp.target_epsilon=3"], "exactly one"),
        (["privacy.dp.mode=local", "privacy.dp.adaptive_clipping.lr=0.1"], "mode: central"),
        (["privacy.dp.mode=dpsgd", "federation.strategy.name=fedprox"], "proximal"),
        (["privacy.dp.clipp=1"], "unknown key"),
    ],
)
def test_false_privacy_claims_are_config_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"privacy": {"dp": {"noise_multiplier": 1.0}}}, sets)
