"""DP in a study: per-network privacy settings, ε per run in results.json, and what DP cost
against the same model trained without it (``privacy_cost`` on a hand-made results document)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medfed.config import ConfigError
from medfed.study.config import RESERVED_KEYS, build_study_config
from medfed.study.privacy import (
    CLASSIFICATION_METRICS,
    metric_drop,
    privacy_cost,
    privacy_meta,
    twins,
)
from medfed.types import Paradigm

DPSGD = {"mode": "dpsgd", "target_epsilon": 8.0, "delta": 1e-5, "clip": 1.0}
UNET = {"name": "medfed:smallunet"}


def _study(**changes: Any):
    raw = {
        "task": "segmentation",
        "networks": [
            {"label": "U-Net", "model": UNET},
            {"label": "U-Net + DP", "model": UNET, "privacy": {"dp": DPSGD}},
        ],
        "budget": {"pooled_epochs": 2},
        "federation": {"rounds": 2},
    }
    return build_study_config({**raw, **changes})


# --- config ---


def test_privacy_is_off_by_default_and_a_network_override_applies_to_that_network_only():
    cfg = _study()
    plain, private = cfg.networks
    for p in cfg.paradigms:
        assert cfg.run_config(plain, p).privacy.dp is None
        dp = cfg.run_config(private, p).privacy.dp
        assert dp is not None and str(dp.mode) == "dpsgd" and dp.target_epsilon == 8.0
    assert "privacy" in RESERVED_KEYS


def test_study_wide_privacy_applies_to_every_network_unless_one_turns_it_off():
    cfg = _study(
        networks=[
            {"label": "A", "model": UNET},
            {"label": "B", "model": UNET, "privacy": {}},
        ],
        privacy={"dp": {"mode": "local", "noise_multiplier": 1.0, "clip": 0.5}},
    )
    a, b = cfg.networks
    dp = cfg.run_config(a, Paradigm.FEDERATED).privacy.dp
    assert dp is not None and str(dp.mode) == "local" and dp.noise_multiplier == 1.0
    assert cfg.run_config(b, Paradigm.FEDERATED).privacy.dp is None


def test_a_false_privacy_claim_is_an_error_naming_the_network():
    # SCAFFOLD's control variates escape the clip: refused for the DP network only.
    with pytest.raises(ConfigError, match=r"network 'U-Net \+ DP'.*scaffold"):
        _study(federation={"rounds": 2, "strategy": {"name": "scaffold"}})
    # Centralized and local-only runs train with FedAvg, whatever the federation's strategy.
    cfg = _study(
        federation={"rounds": 2, "strategy": {"name": "scaffold"}},
        paradigms=["centralized", "local"],
    )
    assert cfg.run_config(cfg.networks[1], Paradigm.CENTRALIZED).privacy.dp is not None
    with pytest.raises(ConfigError, match=r"network 'Plain'.*central"):
        _study(
            networks=[{"label": "Plain", "model": UNET}],
            privacy={"dp": {"mode": "central", "noise_multiplier": 1.0}},
            federation={"rounds": 2, "strategy": {"name": "median"}},
        )
    with pytest.raises(ConfigError, match="reserved"):
        _study(networks=[{"label": "privacy", "model": UNET}])
    with pytest.raises(ConfigError, match="noise_multiplier and target_epsilon"):
        _study(networks=[{"label": "X", "model": UNET, "privacy": {"dp": {"mode": "dpsgd"}}}])


# --- results.json: meta.privacy from the runs' summaries ---


def _spent(site_eps: dict[str, float], sigma: float) -> dict[str, Any]:
    return {
        "mode": "dpsgd",
        "delta": 1e-5,
        "accountant": "rdp",
        "epsilon": site_eps,
        "max_epsilon": max(site_eps.values()),
        "noise_multiplier": dict.fromkeys(site_eps, sigma),
        "clip": 1.0,
    }


def test_privacy_meta_reads_each_runs_summary_and_local_sites_separately(tmp_path: Path):
    cfg = _study(paradigms=["federated", "local"])
    summaries = {
        ("U-Net", "federated"): {"privacy": None},
        ("U-Net", "local:s1"): {"privacy": None},
        ("U-Net + DP", "federated"): {
            "privacy": _spent({"s1": 7.5, "s2": 7.9}, 0.8) | {"site_val": {}},
            "stopped": "round 3: privacy budget exhausted",
        },
        ("U-Net + DP", "local:s1"): {"privacy": _spent({"s1": 6.25}, 0.9)},
    }
    run_dirs: dict[str, dict[str, Path]] = {}
    for (net, key), summary in summaries.items():
        d = tmp_path / net.replace(" ", "_") / key.replace(":", "/")
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summary | {"rounds": 3}))
        run_dirs.setdefault(net, {})[key] = d
    meta = privacy_meta(cfg, run_dirs)
    assert meta["U-Net"] == {"dp": None, "spent": {"federated": None, "local:s1": None}}
    dp = meta["U-Net + DP"]
    assert dp["dp"] == {
        "mode": "dpsgd",
        "clip": 1.0,
        "noise_multiplier": None,
        "target_epsilon": 8.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "max_epsilon": None,
        "adaptive_clipping": None,
        "secure_rng": False,
    }
    assert dp["spent"]["federated"] == _spent({"s1": 7.5, "s2": 7.9}, 0.8)  # only the ledger
    assert dp["spent"]["local:s1"]["epsilon"] == {"s1": 6.25}
    assert dp["stopped"] == {"federated": "round 3: privacy budget exhausted"}


# --- the privacy cost, on a hand-made document ---


def _seg(dice: float | None, jaccard: float, pixel_acc: float) -> dict[str, Any]:
    return {"n": 10, "dice": dice, "jaccard": jaccard, "pixel_acc": pixel_acc}


def _doc() -> dict[str, Any]:
    """U-Net (no DP), U-Net + DP, Wide + DP (no twin: its only same-model sibling has DP too),
    Wide DP 2, and a second plain U-Net that must not be chosen as the twin (the first wins)."""
    dp = {"mode": "dpsgd", "delta": 1e-5, "clip": 1.0}
    none = {"dp": None, "spent": {}}
    return {
        "meta": {
            "task": "segmentation",
            "networks": ["U-Net", "U-Net + DP", "Wide + DP", "Wide DP 2", "U-Net again"],
            "models": {
                "U-Net": "medfed:smallunet",
                "U-Net + DP": "medfed:smallunet",
                "Wide + DP": "monai:unet",
                "Wide DP 2": "monai:unet",
                "U-Net again": "medfed:smallunet",
            },
            "paradigms": ["centralized", "federated"],
            "privacy": {
                "U-Net": none,
                "U-Net + DP": {
                    "dp": dp,
                    "spent": {
                        "centralized": _spent({"pooled": 3.0}, 1.2),
                        "federated": _spent({"a": 7.25, "b": 7.5}, 0.8),
                    },
                    "stopped": {"federated": "round 7: privacy budget exhausted"},
                },
                "Wide + DP": {"dp": dp, "spent": {}},
                "Wide DP 2": {"dp": dp, "spent": {}},
                "U-Net again": none,
            },
        },
        "U-Net": {
            "federated": {
                "internal": _seg(0.80, 0.60, 0.96),
                "external": _seg(0.50, 0.40, 0.0),
                "site:a": _seg(0.75, 0.5, 0.9),
            },
        },
        "U-Net + DP": {
            # centralized: the twin has none, so nothing to compare
            "centralized": {"internal": _seg(0.1, 0.1, 0.1)},
            "federated": {
                "internal": _seg(0.70, 0.45, 0.90),
                "external": _seg(0.60, 0.30, 0.5),
                "site:a": _seg(None, 0.5, 0.9),
            },
        },
        "U-Net again": {"federated": {"internal": _seg(0.0, 0.0, 0.0)}},
    }


def test_twin_is_the_first_same_model_network_without_dp():
    assert twins(_doc()) == {"U-Net + DP": "U-Net"}


def test_privacy_cost_numbers_are_the_hand_computed_ones():
    cost = privacy_cost(_doc())
    assert list(cost) == ["U-Net + DP"]
    block = cost["U-Net + DP"]
    assert block["twin"] == "U-Net" and block["model"] == "medfed:smallunet"
    assert block["metrics"] == ["dice", "jaccard", "pixel_acc"]
    assert list(block["paradigms"]) == ["federated"]
    fed = block["paradigms"]["federated"]
    assert fed["epsilon"] == 7.5  # the most-exposed site
    assert fed["delta"] == 1e-5 and fed["mode"] == "dpsgd" and fed["clip"] == 1.0
    assert fed["noise_multiplier"] == {"a": 0.8, "b": 0.8}
    assert fed["stopped"] == "round 7: privacy budget exhausted"
    internal = fed["splits"]["internal"]
    assert internal["dice"] == pytest.approx(
        {"without_dp": 0.80, "with_dp": 0.70, "drop": 0.10, "relative_drop_pct": 12.5}
    )
    assert internal["jaccard"] == pytest.approx(
        {"without_dp": 0.60, "with_dp": 0.45, "drop": 0.15, "relative_drop_pct": 25.0}
    )
    assert internal["pixel_acc"] == pytest.approx(
        {"without_dp": 0.96, "with_dp": 0.90, "drop": 0.06, "relative_drop_pct": 6.25}
    )
    external = fed["splits"]["external"]
    # DP doing better is a negative drop; a zero baseline has no relative drop
    assert external["dice"] == pytest.approx(
        {"without_dp": 0.50, "with_dp": 0.60, "drop": -0.10, "relative_drop_pct": -20.0}
    )
    assert external["pixel_acc"]["drop"] == pytest.approx(-0.5)
    assert external["pixel_acc"]["relative_drop_pct"] is None
    # an undefined metric stays undefined rather than becoming a number
    assert fed["splits"]["site:a"]["dice"] == {
        "without_dp": 0.75,
        "with_dp": None,
        "drop": None,
        "relative_drop_pct": None,
    }
    json.dumps(cost, allow_nan=False)  # what results.json requires


def test_classification_cost_uses_auc_and_the_operating_point_metrics():
    doc = _doc()
    doc["meta"]["task"] = "classification"
    values = {"auc": 0.9, "accuracy": 0.8, "sensitivity": 0.75, "specificity": 0.85, "f1": 0.5}
    doc["U-Net"]["federated"] = {"internal": values}
    doc["U-Net + DP"]["federated"] = {"internal": {k: v - 0.05 for k, v in values.items()}}
    fed = privacy_cost(doc)["U-Net + DP"]["paradigms"]["federated"]
    assert tuple(fed["splits"]["internal"]) == CLASSIFICATION_METRICS
    assert fed["splits"]["internal"]["auc"]["relative_drop_pct"] == pytest.approx(100 * 0.05 / 0.9)
    assert fed["splits"]["internal"]["f1"]["drop"] == pytest.approx(0.05)


def test_no_dp_no_cost():
    doc = _doc()
    for name in doc["meta"]["networks"]:
        doc["meta"]["privacy"][name] = {"dp": None, "spent": {}}
    assert twins(doc) == {} and privacy_cost(doc) == {}
    del doc["meta"]["privacy"]  # a results.json from before DP
    assert privacy_cost(doc) == {}


def test_metric_drop_treats_nan_and_missing_as_undefined():
    assert metric_drop(float("nan"), 0.5)["drop"] is None
    assert metric_drop(None, None) == {
        "without_dp": None,
        "with_dp": None,
        "drop": None,
        "relative_drop_pct": None,
    }
