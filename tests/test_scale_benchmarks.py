"""Issue #10's benchmarks must not rot: each runs end to end on a tiny CPU workload.

Figures come from the real sizes (benchmarks/README.md); here only that the runs complete, the
two runtimes reach the same model, and the printed ratios are the measured times' ratios.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).parents[1]


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_clients_throughput_runs_both_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load("scale_clients")
    for name, value in (("TRAIN", 16), ("VAL", 4), ("STEPS", 2), ("BATCH", 8)):
        monkeypatch.setattr(bench, name, value)
    (row,) = bench.throughput("cpu", [3], rounds=2)
    assert row["clients"] == 3
    assert row["speedup"] == pytest.approx(row["seq_wall"] / row["vec_wall"])
    assert row["seq_wall"] > 0 and row["vec_wall"] > 0


def test_scale_clients_federation_is_views_of_one_array() -> None:
    import torch

    bench = _load("scale_clients")
    images, labels = bench.pooled_arrays(3)
    pooled = torch.from_numpy(images)
    fed = bench.federation(pooled, torch.from_numpy(labels), 3)
    ptr = pooled.untyped_storage().data_ptr()
    assert all(s.train.images.untyped_storage().data_ptr() == ptr for s in fed.sites)
    assert sum(len(s.train) + len(s.val) for s in fed.sites) == len(pooled)


def test_vs_flower_without_flower_reaches_the_plain_loops_model() -> None:
    bench = _load("vs_flower")
    args = bench.parse_args(["--device", "cpu", "--clients", "2", "--images", "20", "--no-flower"])
    (row,) = bench.compare(args)
    assert row["plain"] > 0 and row["medfed"] > 0 and row["vmap"] > 0
    assert row["flower"] != row["flower"]  # NaN: not run
    # The same arithmetic as the plain loop; five rounds may amplify last bits, never more.
    assert row["diff_medfed"] < 1e-2 and row["diff_vmap"] < 1e-2
