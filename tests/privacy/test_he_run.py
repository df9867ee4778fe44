"""privacy.he in a run: the encrypted federation trains the model the plaintext one does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medfed.config import ConfigError, build_config
from medfed.engine import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_federation  # noqa: E402


def _cfg(*sets: str):
    return build_config(
        {
            "device": "cpu",
            "model": {"name": "medfed:tinycnn"},
            "federation": {"rounds": 2, "min_clients": 2},
            "train": {"batch_size": 16},
        },
        list(sets),
    )


def test_encrypted_run_matches_plaintext_and_reports_its_cost(tmp_path):
    fed = make_federation(3, n=32)
    clear = run(_cfg(), out_dir=tmp_path / "clear", federation=fed, progress=False)
    enc = run(_cfg("privacy.he={}"), out_dir=tmp_path / "he", federation=fed, progress=False)
    for k, v in clear.final_params.items():
        if v.is_floating_point():
            # CKKS error (~1e-7 per round) can only grow through two rounds of training.
            assert (enc.final_params[k] - v).abs().max().item() <= 1e-4, k
        else:
            assert (enc.final_params[k] == v).all(), k
    rows = list(enc.history)
    for row, ref in zip(rows, clear.history, strict=True):
        he = row["extra"]["he"]
        assert he["bytes_up"] == row["bytes_up"] > 10 * ref["bytes_up"]
        assert he["expansion"] > 10
        assert he["encrypt_s"] > 0 and he["decrypt_s"] > 0


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["privacy.he={}", "federation.strategy.name=median"], "plain weighted mean"),
        (["privacy.he={}", "federation.strategy.name=fedadam"], "plain weighted mean"),
        (
            ["privacy.he={}", "privacy.dp.mode=central", "privacy.dp.noise_multiplier=1"],
            "central",
        ),
        (["privacy.he.poly_modulus_degree=5000"], "power of two"),
    ],
)
def test_he_settings_that_cannot_hold_are_config_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*sets)
