"""Benchmarks must not rot: each runs end to end on a tiny CPU workload (figures come from GPUs)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _load(name: str):
    module_name = f"benchmarks_{name}"
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up by name
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


def test_flower_overhead_cli_and_wire_size(monkeypatch):
    pytest.importorskip("flwr")
    import torch
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    bench = _load("flower_overhead")
    args = bench.parse_args(["--rounds", "2", "--scale", "0.05", "--image-size", "32", "--keep"])
    assert (args.rounds, args.scale, args.image_size, args.keep) == (2, 0.05, 32, True)
    assert bench.parse_args([]).rounds == 3
    for attr in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, attr, 1)
    msg = Message(
        RecordDict({"p": ArrayRecord({"w": torch.zeros(1000)})}),
        dst_node_id=2,
        message_type="train",
    )
    size = bench.wire_size(msg)
    assert 4000 < size.proto < size.shipped < 4000 + 2000  # 4 kB of float32 + framing
    assert size.objects == 5  # message, RecordDict, ArrayRecord, Array, one ArrayChunk


@pytest.mark.slow
def test_seg_overhead_smoke_reaches_identical_parameters(capsys):
    bench = _load("seg_overhead")
    args = ["--sites", "2", "--scale", "0.02", "--image-size", "32", "--rounds", "1"]
    assert bench.main([*args, "--repeats", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "ratio wall" in line
    diff = float(line.rsplit("max |param diff|", 1)[1])
    assert diff < 1e-5  # the same arithmetic, in the engine and in plain PyTorch


def test_he_overhead_smoke_matches_plaintext(capsys):
    pytest.importorskip("tenseal")
    bench = _load("he_overhead")
    assert bench.main(["--models", "tinycnn", "--sites", "2", "--repeats", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert line[0] == "tinycnn"
    expansion, err = float(line[4]), float(line[-1])
    assert expansion > 10  # CKKS ciphertexts are ~20x float32
    assert err < 1e-6  # the encrypted round lands on plaintext FedAvg


@pytest.mark.slow
def test_one_shot_vs_fedavg_smoke_scores_each_model_at_its_own_cut(capsys, tmp_path):
    bench = _load("one_shot_vs_fedavg")
    sets = [
        "data.ultrasound.scale=0.02",
        "data.ultrasound.image_size=32",
        "data.cache_dir=" + str(tmp_path / "cache"),
        "federation.rounds=2",
        "one_shot.fedisca.synthesis_iterations=2",
        "one_shot.fedisca.batch_size=8",
        "one_shot.fedisca.snapshot_every=1",
        "one_shot.fedisca.rounds=2",
    ]
    args = ["--out", str(tmp_path / "runs"), "--threads", "1"]
    assert bench.main(args + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    cuts = [line for line in out.splitlines() if "at the internal Youden cut" in line]
    assert (
        len(cuts) == 6
    )  # one-shot, teacher ensemble and average, FedAvg 1 and 2 rounds, centralized
    for line in cuts:
        val_acc = float(line.split("val acc ")[1].split()[0])
        assert 0.0 <= val_acc <= 1.0
    assert (
        "one-shot / FedAvg(2 rounds): val acc"
        in out.split("at each model's internal Youden cut:")[1]
    )
    ens = next(line for line in out.splitlines() if line.strip().startswith("ensemble:"))
    assert 0.0 <= float(ens.split("auc ")[1].split()[0]) <= 1.0
    assert "one-shot / teacher ensemble: val acc at the cut" in out
    avg = next(line for line in out.splitlines() if line.strip().startswith("average:"))
    assert "1 round of their 2 local epochs" in avg
    tests = out.split("paired tests, one-shot minus:")[1].splitlines()[1:4]
    assert [t.split(":")[0].strip() for t in tests] == ["fedavg_1", "average", "fedavg_2"]
    for line in tests:
        p_values = [float(x.split(")")[0].split(",")[0]) for x in line.split(" p ")[1:]]
        assert len(p_values) == 3 and all(0.0 <= p <= 1.0 for p in p_values)

    # --reuse rescores the kept runs without training them again, to the same figures
    weights = tmp_path / "runs" / "one_shot" / "final.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert bench.main(args + ["--reuse"] + [a for s in sets for a in ("--set", s)]) == 0
    again = capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp
    assert again.split("paired tests")[1] == out.split("paired tests")[1]
    with pytest.raises(SystemExit, match="another config"):
        changed = [*sets, "train.lr=0.01"]
        bench.main(args + ["--reuse"] + [a for s in changed for a in ("--set", s)])


@pytest.mark.slow
def test_fedisca_distill_sweep_reproduces_the_run_then_varies_it(capsys, tmp_path):
    """The sweep re-synthesizes the run's images: its reference row must score what the run did."""
    from medfed.config import load_config
    from medfed.engine import run

    sets = [
        "data.ultrasound.scale=0.02",
        "data.ultrasound.image_size=32",
        "data.cache_dir=" + str(tmp_path / "cache"),
        "federation.rounds=2",
        "one_shot.fedisca.synthesis_iterations=3",
        "one_shot.fedisca.batch_size=8",
        "one_shot.fedisca.snapshot_every=1",
        "one_shot.fedisca.rounds=2",
    ]
    cfg = load_config(ROOT / "configs" / "one-shot-thyroid.yaml", sets)
    cfg = cfg.model_copy(update={"device": "cpu"})
    res = run(cfg, out_dir=tmp_path / "run", progress=False)
    bench = _load("fedisca_distill_sweep")
    args = ["--run", str(tmp_path / "run"), "--threads", "1", "--vary", "distill_lr=0.05"]
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "best epoch" in line]
    assert len(rows) == 2  # the run's settings, then the one variant
    assert rows[1].strip().startswith("distill_lr=0.05:")
    swept = float(rows[0].split("val auc ")[1].split()[0])
    assert swept == pytest.approx(res.summary["val"]["auc"], abs=2e-3)  # printed to 3 places
    with pytest.raises(SystemExit, match="synthesis_iterations"):
        bench.main([*args[:4], "--vary", "synthesis_iterations=5"])
    # cached syntheses, whole or in part (the generator state travels with each round), give
    # the same students as synthesizing afresh
    cache = ["--cache", str(tmp_path / "syntheses")]
    for drop in (None, "synthesis-001.safetensors"):
        if drop is not None:
            (tmp_path / "syntheses" / drop).unlink()
        assert bench.main([*args, *cache]) == 0
        again = [line for line in capsys.readouterr().out.splitlines() if "best epoch" in line]
        assert [r.rsplit(")", 1)[0] for r in again] == [r.rsplit(")", 1)[0] for r in rows]
    # a cache made for other teachers or settings is refused, naming the file
    import torch

    gen = torch.Generator()
    path = tmp_path / "syntheses" / "synthesis-000.safetensors"
    with pytest.raises(SystemExit, match="synthesis-000.safetensors: synthesized for other"):
        bench.load_synthesis(tmp_path / "syntheses", 0, gen, key="0" * 16)
    assert path.is_file()  # refused, not overwritten
