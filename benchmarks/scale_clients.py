"""Scale (issue #10): vectorised vs sequential client training, and memory vs registered clients.

Throughput. C clients per round (every registered site sampled), each holding 128 images
1x28x28 and taking 16 local steps of batch 32 (4 local epochs) with ``medfed:tinycnn``, SGD lr
0.05 momentum 0.9, flips and per-image normalisation, through medfed's whole engine (``run``:
update validation, aggregation, pooled validation every round, checkpoints, history). The same
run twice in one process, ``runtime.vectorize=off`` (one reused worker model, ``load_state_dict``
per client) and ``on`` (``torch.func.vmap`` over stacked client parameters); printed: rounds/s
and images/s over the whole run (set-up, evaluation and checkpoints included) and per steady
round (median ``history.jsonl`` round seconds after the first), and the ratio.

Memory. R registered sites (10 and 1,000), 10 sampled per round, 3 rounds of the same workload,
site data memory-mapped from one ``.npy`` file (only sampled sites' pages are read); each R in a
fresh subprocess; printed: peak RSS and peak GPU memory, and the ratio R=1,000 / R=10.

    python benchmarks/scale_clients.py                        # auto device; CPU: 10 and 100
    python benchmarks/scale_clients.py --device cuda --clients 10 100 1000
    python benchmarks/scale_clients.py --skip-memory --clients 10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfed.client.train import resolve_device  # noqa: E402
from medfed.config import RunConfig, build_config  # noqa: E402
from medfed.data.site import ArrayDataset, Federation, Site  # noqa: E402
from medfed.engine import run  # noqa: E402

TRAIN, VAL, STEPS, BATCH, ROUNDS = 128, 8, 16, 32, 3
CHUNK = [256]  # runtime.vector_chunk (--chunk)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared VM)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--clients", type=int, nargs="*", help="clients per round")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--registered", type=int, nargs="*", default=[10, 1000])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=256, help="runtime.vector_chunk")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def pooled_arrays(sites: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(sites*(TRAIN+VAL), 1, 28, 28) uint8 images with a faint class bar, and labels."""
    rng = np.random.default_rng(seed)
    n = sites * (TRAIN + VAL)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 200, size=(n, 1, 28, 28), dtype=np.uint8)
    for k in range(10):
        images[labels == k, :, 4 + 2 * k : 6 + 2 * k, 4:24] += 50
    return images, labels


def federation(images: torch.Tensor, labels: torch.Tensor, sites: int) -> Federation:
    """Sites as views of one pooled array: no per-site copy (and none read until used)."""
    out = []
    for i in range(sites):
        a, b, c = i * (TRAIN + VAL), i * (TRAIN + VAL) + TRAIN, (i + 1) * (TRAIN + VAL)
        out.append(
            Site(
                f"c{i:04d}",
                ArrayDataset(images[a:b], labels[a:b]),
                ArrayDataset(images[b:c], labels[b:c]),
            )
        )
    return Federation(tuple(out))


def config(
    device: str, *, vectorize: str, rounds: int, fraction: float, min_clients: int
) -> RunConfig:
    return build_config(
        {
            "seed": 0,
            "device": device,
            "model": {"name": "medfed:tinycnn"},
            "train": {
                "batch_size": BATCH,
                "epochs": STEPS * BATCH / TRAIN,
                "lr": 0.05,
                "momentum": 0.9,
                "amp": False,  # the vectorised path does not reproduce bf16 autocast
            },
            "federation": {"rounds": rounds, "fraction": fraction, "min_clients": min_clients},
            "runtime": {"vectorize": vectorize, "site_metrics": False, "vector_chunk": CHUNK[0]},
            # Sites still sign and the coordinator still chains every update; only the per-site
            # replica files (one SQLite file per simulated site) are shared in memory.
            "ledger": {"replicas": False},
        }
    )


def timed_run(
    cfg: RunConfig, fed: Federation
) -> tuple[float, float, float, dict[str, torch.Tensor]]:
    """(whole-run seconds, process CPU seconds, median steady round seconds, final params).

    CPU seconds are insensitive to time stolen by other processes on a shared machine.
    """
    with tempfile.TemporaryDirectory() as d:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        res = run(cfg, out_dir=Path(d) / "run", federation=fed, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = [json.loads(x) for x in (Path(d) / "run" / "history.jsonl").read_text().splitlines()]
    steady = statistics.median(r["seconds"] for r in rows[1:]) if len(rows) > 1 else wall
    return wall, cpu, steady, res.final_params


def throughput(device: str, clients: Sequence[int], rounds: int) -> list[dict[str, float]]:
    print(
        f"{'clients':>7} {'mode':>10} {'rounds/s':>9} {'img/s':>10} {'steady r/s':>10} "
        f"{'steady img/s':>12} {'CPU s':>8} {'speed-up wall':>13} {'CPU':>6} {'max|dparam|':>11}"
    )
    rows = []
    for i, c in enumerate(clients):
        images, labels = pooled_arrays(c)
        fed = federation(torch.from_numpy(images), torch.from_numpy(labels), c)
        if i == 0:  # one-time process costs (lazy imports, allocator, kernels) for neither mode
            for mode in ("off", "on"):
                timed_run(
                    config(device, vectorize=mode, rounds=1, fraction=1.0, min_clients=1), fed
                )
        per_round = c * STEPS * BATCH
        results = {}
        for mode in ("off", "on"):
            cfg = config(device, vectorize=mode, rounds=rounds, fraction=1.0, min_clients=1)
            results[mode] = timed_run(cfg, fed)
        (w_off, c_off, s_off, p_off), (w_on, c_on, s_on, p_on) = results["off"], results["on"]
        diff = max(float((p_off[k].double() - p_on[k].double()).abs().max()) for k in p_off)
        for mode, (wall, cpu, steady, _) in results.items():
            label = "sequential" if mode == "off" else "vectorised"
            speed = f"{w_off / wall:>12.2f}x {c_off / cpu:>5.2f}x" if mode == "on" else " " * 20
            print(
                f"{c:>7} {label:>10} {rounds / wall:>9.3f} {rounds * per_round / wall:>10.0f} "
                f"{1 / steady:>10.3f} {per_round / steady:>12.0f} {cpu:>8.1f} {speed} "
                + (f"{diff:>11.1e}" if mode == "on" else "")
            )
        rows.append(
            {
                "clients": c,
                "seq_wall": w_off,
                "vec_wall": w_on,
                "speedup": w_off / w_on,
                "cpu_speedup": c_off / c_on,
                "steady_speedup": s_off / s_on,
            }
        )
        print(f"{'':>7} steady-round speed-up {s_off / s_on:.2f}x")
    return rows


def memory_child(path: Path) -> None:
    """One registered-size configuration, alone in this process: print its peak memory."""
    spec = json.loads(path.read_text())
    pooled = ArrayDataset.from_npy(spec["images"], spec["labels"], mmap=True)
    fed = federation(pooled.images, pooled.labels, spec["registered"])
    cfg = config(
        spec["device"],
        vectorize="on",
        rounds=spec["rounds"],
        fraction=spec["sampled"] / spec["registered"],
        min_clients=spec["sampled"],
    )
    device = resolve_device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as d:
        run(cfg, out_dir=Path(d) / "run", federation=fed, progress=False)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    print(json.dumps({"rss_mb": rss_mb, "gpu_mb": gpu_mb}))


def memory(device: str, registered: Sequence[int], sampled: int, rounds: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        images, labels = pooled_arrays(max(registered))
        np.save(Path(d) / "images.npy", images)
        np.save(Path(d) / "labels.npy", labels)
        del images
        for r in registered:
            spec = Path(d) / f"spec{r}.json"
            spec.write_text(
                json.dumps(
                    {
                        "images": str(Path(d) / "images.npy"),
                        "labels": str(Path(d) / "labels.npy"),
                        "registered": r,
                        "sampled": sampled,
                        "rounds": rounds,
                        "device": device,
                    }
                )
            )
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    *("--memory-child", str(spec), "--threads", str(torch.get_num_threads())),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            rows.append({"registered": r} | json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(
        f"{'registered':>10} {'sampled':>8} {'peak RSS MB':>12} {'peak GPU MB':>12} {'RSS ratio':>10}"
    )
    for row in rows:
        print(
            f"{row['registered']:>10} {sampled:>8} {row['rss_mb']:>12.0f} {row['gpu_mb']:>12.1f} "
            f"{row['rss_mb'] / base['rss_mb']:>9.2f}x"
            + (f"  GPU {row['gpu_mb'] / base['gpu_mb']:.2f}x" if base["gpu_mb"] else "")
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    CHUNK[0] = args.chunk
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return 0
    device = str(resolve_device(args.device))
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU"
    print(f"torch {torch.__version__}, device {device} ({gpu}), {torch.get_num_threads()} threads")
    clients = args.clients or ([10, 100, 1000] if device.startswith("cuda") else [10, 100])
    if not args.skip_throughput:
        print(f"\nthroughput: {STEPS} steps x batch {BATCH} per client, {args.rounds} rounds")
        throughput(device, clients, args.rounds)
    if not args.skip_memory:
        print(f"\nmemory: {args.sampled} sampled per round, {args.rounds} rounds, mmap'd data")
        memory(device, args.registered, args.sampled, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
