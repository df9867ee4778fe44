"""Run issue #10's benchmarks and print one summary table against the issue's targets.

``scale_clients.py`` (vectorised vs sequential rounds, memory vs registered clients) and
``vs_flower.py`` (medfed vs plain PyTorch vs Flower's simulation engine), each in this process
with its own same-run references; the table repeats their key ratios.

    python benchmarks/run_all.py                          # auto device
    python benchmarks/run_all.py --device cpu --quick     # small sizes, no Flower (minutes)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import scale_clients  # noqa: E402
import vs_flower  # noqa: E402

from medfed.client.train import resolve_device  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared VM)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--quick", action="store_true", help="10 clients, 100 registered, no Flower"
    )
    return parser.parse_args(argv)


def _met(value: float, target: float, *, at_most: bool) -> str:
    if math.isnan(value):
        return "n/a"
    return "yes" if (value <= target if at_most else value >= target) else "no"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = str(resolve_device(args.device))
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str, str, str, str]] = []

    print("== scale_clients.py: throughput ==")
    clients = [10] if args.quick else None
    clients = clients or ([10, 100, 1000] if device.startswith("cuda") else [10, 100])
    for r in scale_clients.throughput(device, clients, scale_clients.ROUNDS):
        target = "≥ 30× (H100)" if r["clients"] == 1000 else "—"
        met = _met(r["speedup"], 30.0, at_most=False) if r["clients"] == 1000 else "—"
        rows.append(
            (
                f"vectorised / sequential, {r['clients']} clients/round",
                f"{r['speedup']:.2f}× wall, {r['cpu_speedup']:.2f}× CPU time",
                target,
                met,
                device,
            )
        )

    print("\n== scale_clients.py: memory ==")
    registered = [10, 100] if args.quick else [10, 1000]
    mem = scale_clients.memory(device, registered, 10, scale_clients.ROUNDS)
    rss = mem[-1]["rss_mb"] / mem[0]["rss_mb"]
    label = f"peak RSS, {registered[-1]} / {registered[0]} registered"
    rows.append((label, f"{rss:.2f}×", "≤ 1.2×", _met(rss, 1.2, at_most=True), device))
    if mem[0]["gpu_mb"]:
        gpu = mem[-1]["gpu_mb"] / mem[0]["gpu_mb"]
        rows.append(
            (
                label.replace("RSS", "GPU memory"),
                f"{gpu:.2f}×",
                "≤ 1.2×",
                _met(gpu, 1.2, at_most=True),
                device,
            )
        )

    print("\n== vs_flower.py ==")
    vs_args = ["--device", device, "--threads", str(args.threads)] + (
        ["--clients", "10", "--images", "100", "--no-flower"] if args.quick else []
    )
    for r in vs_flower.compare(vs_flower.parse_args(vs_args)):
        w = f"{r['clients']}×{r['images']}"
        ratio = r["medfed"] / r["plain"]
        rows.append(
            (
                f"medfed / plain, {w}",
                f"{ratio:.3f} wall, {r['medfed_cpu'] / r['plain_cpu']:.3f} CPU time",
                "≤ 1.10",
                _met(ratio, 1.10, at_most=True),
                device,
            )
        )
        flower = r["flower"] / r["medfed"]
        rows.append(
            (
                f"Flower / medfed, {w}",
                f"{flower:.2f}×",
                "≥ 1.9×",
                _met(flower, 1.9, at_most=False),
                "cpu clients",
            )
        )

    print("\n== summary ==")
    head = ("figure", "measured", "target", "met", "device")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(5)]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
