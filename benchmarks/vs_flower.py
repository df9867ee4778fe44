"""medfed vs Flower's simulation engine vs plain PyTorch on the engine-overhead workload (#10 §3).

Workload (issue #2, as ``engine_overhead.py``): N clients x M images 1x28x28, ``medfed:tinycnn``,
SGD lr 0.05 without momentum, batch 32, 1 local epoch, 5 rounds of FedAvg, pooled validation
accuracy after every round; 10 x 500 and 50 x 100. In one process, for each workload:

* plain: textbook FedAvg in PyTorch (``engine_overhead.plain_run``'s loop, on ``--device``);
* medfed: ``medfed.run`` end to end (validation, aggregation, evaluation, checkpoints, history)
  with ``runtime.vectorize`` off (the sequential runtime) and on (``torch.func.vmap``);
* Flower: ``flwr.simulation.run_simulation`` (Ray backend; ``flower_peer.py``'s apps, the same
  per-(round, site) seeds), Ray start-up and shutdown included; its clients train on the CPU.
  Flower runs after every plain and medfed run, so Ray's lingering processes slow nobody else.

Printed: wall seconds and the ratios medfed/plain and Flower/medfed. Needs the ``bench`` extra
(``pip install -e '.[bench]'``); ``--no-flower`` skips Flower.

    python benchmarks/vs_flower.py
    python benchmarks/vs_flower.py --clients 10 --images 500 --repeats 2 --no-flower
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from engine_overhead import BATCH, LR, ROUNDS, SEED, make_federation, new_model  # noqa: E402

from medfed.client.train import resolve_device  # noqa: E402
from medfed.config import build_config  # noqa: E402
from medfed.data.site import Federation  # noqa: E402
from medfed.engine import run  # noqa: E402
from medfed.seeding import derive_seed, torch_generator  # noqa: E402

Params = dict[str, torch.Tensor]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared VM)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--images", type=int, nargs="*", default=[500, 100])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-flower", action="store_true", help="plain and medfed only")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Timing = tuple[float, float]  # (wall seconds, process CPU seconds)


def plain_run(fed: Federation, device: torch.device) -> tuple[Timing, float, Params]:
    """``engine_overhead.plain_run`` on ``device``: (timing, final accuracy, final params)."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(derive_seed(SEED, "init"))
    model = new_model().to(device)
    data = [(s.train.to(device), s.val.to(device), s.name) for s in fed.sites]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    acc = float("nan")
    for r in range(ROUNDS):
        states, weights = [], []
        for train, _, name in data:
            model.load_state_dict(state)
            torch.manual_seed(derive_seed(SEED, "torch", r, name))
            g = torch_generator(SEED, "train", r, name)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
            model.train()
            perm = torch.randperm(len(train), generator=g).to(device)
            for i in range(0, len(train), BATCH):
                idx = perm[i : i + BATCH]
                if len(idx) < 2:
                    continue
                x = (train.images[idx].float() / 255 - 0.5) / 0.25
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), train.labels[idx]).backward()
                opt.step()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(train))
        total = sum(weights)
        state = {
            k: sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(
                state[k].dtype
            )
            for k in state
        }
        model.load_state_dict(state)
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for _, val, _ in data:
                x = (val.images.float() / 255 - 0.5) / 0.25
                correct += int((model(x).argmax(1) == val.labels).sum())
                seen += len(val)
        acc = correct / seen
    _sync(device)
    return (time.perf_counter() - t0, time.process_time() - c0), acc, state


def medfed_run(
    fed: Federation, device: torch.device, vectorize: str
) -> tuple[Timing, float, Params]:
    cfg = build_config(
        {
            "seed": SEED,
            "device": str(device),
            "model": {"name": "medfed:tinycnn"},
            "train": {
                "batch_size": BATCH,
                "lr": LR,
                "momentum": 0.0,
                "augment": False,
                "normalize": "fixed",
                "amp": False,
            },
            "federation": {"rounds": ROUNDS, "min_clients": 1},
            "runtime": {"vectorize": vectorize},
        }
    )
    with tempfile.TemporaryDirectory() as d:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        res = run(cfg, out_dir=Path(d) / "run", federation=fed, progress=False)
        _sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return (wall, cpu), float(res.history.last["val_acc"]), res.final_params  # type: ignore[index]


def max_diff(a: Params, b: Params) -> float:
    return max(float((a[k].double().cpu() - b[k].double().cpu()).abs().max()) for k in a)


def compare(args: argparse.Namespace) -> list[dict[str, float]]:
    """One row per workload: median seconds of each runner, accuracies, parameter gaps."""
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    flower_run = None
    if not args.no_flower:
        import flwr
        from flower_peer import flower_run  # type: ignore[no-redef]

        print(f"flwr {flwr.__version__} (Ray backend, clients on the CPU)")
    print(
        f"{'workload':>12} {'plain s':>8} {'medfed s':>9} {'vmap s':>8} {'flower s':>9} "
        f"{'medfed/plain':>12} {'CPU':>6} {'vmap/plain':>10} {'CPU':>6} {'flower/medfed':>13}  "
        "accuracy plain/medfed/vmap/flower, max|dparam| medfed vmap"
    )
    # Every plain and medfed run first, Flower's runs last: Ray's processes wind down for seconds
    # after a simulation ends, and on a small machine they would slow whatever runs next.
    measured = []
    for clients, images in zip(args.clients, args.images, strict=True):
        fed = make_federation(clients, images)
        plain_run(fed, device)  # warm-up (allocator, kernels)
        t_plain: list[Timing] = []
        t_med: list[Timing] = []
        t_vec: list[Timing] = []
        accs: tuple[float, ...] = ()
        diffs = (0.0, 0.0)
        for _ in range(args.repeats):
            tp, ap, pp = plain_run(fed, device)
            tm, am, pm = medfed_run(fed, device, "off")
            tv, av, pv = medfed_run(fed, device, "on")
            t_plain.append(tp)
            t_med.append(tm)
            t_vec.append(tv)
            accs = (ap, am, av)
            diffs = (max_diff(pp, pm), max_diff(pp, pv))
        measured.append((clients, images, fed, t_plain, t_med, t_vec, accs, diffs))
    rows = []
    for clients, images, fed, t_plain, t_med, t_vec, accs, diffs in measured:
        t_flw: list[float] = []
        af = float("nan")
        if flower_run is not None:
            for _ in range(args.repeats):
                tf, log = flower_run(fed, clients, images)
                af = log["acc"]
                t_flw.append(tf)
        p, m, v = (statistics.median(t[0] for t in ts) for ts in (t_plain, t_med, t_vec))
        pc, mc, vc = (statistics.median(t[1] for t in ts) for ts in (t_plain, t_med, t_vec))
        f = statistics.median(t_flw) if t_flw else float("nan")
        print(
            f"{f'{clients}x{images}':>12} {p:>8.2f} {m:>9.2f} {v:>8.2f} {f:>9.2f} "
            f"{m / p:>12.3f} {mc / pc:>6.3f} {v / p:>10.3f} {vc / pc:>6.3f} {f / m:>13.2f}  "
            + "/".join(f"{a:.4f}" for a in (*accs, af))
            + f", {diffs[0]:.1e} {diffs[1]:.1e}"
        )
        rows.append(
            {
                "clients": clients,
                "images": images,
                "plain": p,
                "medfed": m,
                "vmap": v,
                "flower": f,
                "plain_cpu": pc,
                "medfed_cpu": mc,
                "vmap_cpu": vc,
                "diff_medfed": diffs[0],
                "diff_vmap": diffs[1],
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    compare(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
