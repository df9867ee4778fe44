"""Benchmarks must not rot: each runs end to end on a tiny CPU workload (figures come from GPUs)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_throughput_smoke_on_cpu(capsys):
    bench = _load("gpu_throughput")
    args = ["--device", "cpu", "--image-size", "32", "--batch-size", "4", "--networks", "resnet10t"]
    args += ["--site-images", "8", "--steps", "1", "--sites", "2", "--rounds", "1"]
    assert bench.main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert line[0] == "resnet10t"
    plain, ours, ratio = (float(x) for x in line[1:4])
    assert plain > 0 and ours > 0 and ratio > 0


def test_gpu_throughput_without_cuda_says_so(capsys, monkeypatch):
    import torch

    bench = _load("gpu_throughput")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert "needs a GPU" in capsys.readouterr().out
