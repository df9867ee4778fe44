"""Flower deployment overhead: medfed over a local Flower deployment vs the in-process runtime.

Workload (issue #8 section 5): the synthetic ultrasound federation with 3 sites (no external site),
``medfed:smallcnn``, FedAvg, N rounds, the same config for both runtimes. The deployment is
``LocalDeployment``: one SuperLink (TLS + SuperNode authentication) and 3 SuperNodes on loopback,
subprocess isolation, each SuperNode reading its own site from the shared data cache. Both runs
must end with the same final parameters (printed as max |delta param|).

Printed:

* per-round wall seconds from each run's ``history.jsonl`` and the per-round overhead
  (deployment - in-process) and ratio; the whole deployment's wall time with its start-up
  (SuperLink, registration, SuperNodes online), ``flwr run`` up to the first round, and teardown;
* bytes per round: medfed's tensor payload (``bytes_up`` + ``bytes_down`` in the history) vs the
  serialized Flower messages, measured on real TRAIN / EVALUATE messages and replies built by
  medfed's own ``FlowerRuntime`` and ClientApp functions: the RecordDict as one protobuf
  (``recorddict_to_proto(...).ByteSize()``) and as flwr 1.41 actually ships it (message header
  + object tree + every deflated object: RecordDict, records, arrays, array chunks). HTTP/TLS
  framing and per-object request headers are not included.

    python benchmarks/flower_overhead.py                       # 3 rounds, scale 0.1, 64 px
    python benchmarks/flower_overhead.py --rounds 5 --keep     # keep the work directory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.app.message.message import remove_content_from_message  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.common.serde import message_to_proto, recorddict_to_proto  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import (  # noqa: E402
    get_all_nested_objects,
    get_object_tree,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from medfed.config import RunConfig, load_config  # noqa: E402
from medfed.data.site import Federation  # noqa: E402
from medfed.engine import load_federation, run  # noqa: E402
from medfed.runtime.flower import client as flower_client  # noqa: E402
from medfed.runtime.flower.server import FlowerRuntime  # noqa: E402
from medfed.types import Params  # noqa: E402

SITES = 3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.1, help="synthetic federation scale")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def write_config(workdir: Path, *, rounds: int, scale: float, image_size: int) -> Path:
    raw = {
        "name": "flower-overhead",
        "seed": 0,
        "device": "cpu",
        "data": {
            "cache_dir": str(workdir / "cache"),
            "ultrasound": {
                "scale": scale,
                "num_sites": SITES,
                "image_size": image_size,
                "external": False,
            },
        },
        "model": {"name": "medfed:smallcnn"},
        "train": {"batch_size": 32},
        "federation": {"rounds": rounds, "min_clients": SITES},
    }
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def read_history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- bytes on the wire


class WireSize(NamedTuple):
    proto: int  # the RecordDict as one protobuf message
    shipped: int  # flwr 1.41: message header + object tree + all deflated objects
    objects: int  # how many objects (one request each)


def wire_size(msg: Message) -> WireSize:
    """Serialized size of ``msg`` the way flwr 1.41 serializes it (no HTTP/TLS framing)."""
    proto = recorddict_to_proto(msg.content).ByteSize()
    objects = get_all_nested_objects(msg)
    body = sum(len(o.deflate()) for o in objects.values())
    head = message_to_proto(remove_content_from_message(msg)).ByteSize()
    return WireSize(proto, head + get_object_tree(msg).ByteSize() + body, len(objects))


class _RecordingGrid:
    """Stands in for Flower's Grid: keeps what ``FlowerRuntime`` sends, answers nothing."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def push_messages(self, messages: Sequence[Message]) -> list[str]:
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # what the real Grid does
        self.sent.extend(messages)
        return [m.object_id for m in messages]

    def pull_messages(self, message_ids: Sequence[str]) -> list[Message]:
        return []

    def send_and_receive(self, messages: Sequence[Message], *, timeout: float | None = None):
        self.push_messages(messages)
        return []


def message_sizes(
    config: RunConfig, cfg_path: Path, fed: Federation, params: Params
) -> dict[str, WireSize]:
    """One TRAIN and one EVALUATE exchange with the first site, built by medfed's own code."""
    # What a ServerApp process has set when it builds messages (run id, its own node id).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    nodes = {s.name: 100 + i for i, s in enumerate(fed.sites)}
    grid = _RecordingGrid()
    # A tiny timeout: the recording grid never answers, so the runtime stops waiting at once.
    runtime = FlowerRuntime(grid, nodes=nodes, config=config, timeout=0.01)  # type: ignore[arg-type]
    site = fed.sites[0].name
    runtime.execute(0, [site], params, {})
    train_msg = grid.sent[-1]
    runtime.evaluate(0, params)
    eval_msg = next(m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE)
    ctx = Context(
        run_id=1,
        node_id=nodes[site],
        node_config={"site": site, "data-config": str(cfg_path)},
        state=RecordDict(),
        run_config={},
    )
    return {
        "TRAIN server->site": wire_size(train_msg),
        "TRAIN reply": wire_size(flower_client.train(train_msg, ctx)),
        "EVALUATE server->site": wire_size(eval_msg),
        "EVALUATE reply": wire_size(flower_client.evaluate(eval_msg, ctx)),
    }


# --------------------------------------------------------------------------- the two runs


class _ProcessWatcher(threading.Thread):
    """Samples /proc for this process's descendants: CPU seconds per process, by name.

    The deployment's CPU time (SuperLink, SuperNodes, SuperExecs, ServerApp, every ClientApp,
    the ``flwr`` CLI calls) is the last sample of each process's utime + stime, so a process
    loses at most one interval of CPU. Linux only: elsewhere nothing is recorded.
    """

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.cpu: dict[tuple[int, str], tuple[str, float]] = {}  # (pid, start) -> (name, s)
        self.stop = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _scan(self) -> None:
        stats: dict[int, list[str]] = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    head, tail = (p / "stat").read_text().rsplit(")", 1)
                except OSError:
                    continue
                stats[int(p.name)] = [head.split("(", 1)[1], *tail.split()]
        children: dict[int, list[int]] = {}
        for pid, st in stats.items():
            children.setdefault(int(st[2]), []).append(pid)  # field 4: ppid
        todo = list(children.get(os.getpid(), []))
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            st = stats[pid]  # name, state, ppid, ... utime=14, stime=15, starttime=22 (1-based)
            cpu = (int(st[12]) + int(st[13])) / self.tick
            self.cpu[(pid, st[20])] = (st[0], cpu)

    def run(self) -> None:
        if not Path("/proc").is_dir():
            return
        while not self.stop.wait(self.interval):
            self._scan()

    def by_name(self) -> dict[str, tuple[int, float]]:
        """name -> (processes, CPU seconds)."""
        out: dict[str, tuple[int, float]] = {}
        for name, cpu in self.cpu.values():
            n, total = out.get(name, (0, 0.0))
            out[name] = (n + 1, total + cpu)
        return out


def deployment_run(workdir: Path, cfg_path: Path, fed: Federation, rounds: int) -> dict:
    from medfed.runtime.flower.certs import generate_dev_certificates
    from medfed.runtime.flower.deploy import LocalDeployment, NodeSpec, TlsFiles
    from medfed.runtime.flower.server import write_app_dir

    certs = generate_dev_certificates(workdir / "certs", num_nodes=SITES)
    tls = TlsFiles(certs.ca_cert, certs.server_cert, certs.server_key)
    nodes = [
        NodeSpec(priv, pub, {"site": site.name, "data-config": str(cfg_path)})
        for (priv, pub), site in zip(certs.node_keys, fed.sites, strict=True)
    ]
    out = workdir / "flower-run"
    app_dir = write_app_dir(workdir / "app")
    watcher = _ProcessWatcher()
    watcher.start()
    t0 = time.perf_counter()
    deployment = LocalDeployment(workdir / "deploy", tls=tls, nodes=nodes, startup_timeout=120)
    with deployment as d:
        t_up = time.perf_counter()
        result = d.run_app(
            app_dir,
            run_config={"config": str(cfg_path), "out": str(out), "num-sites": SITES},
            timeout=180 + 120 * rounds,
        )
        t_run = time.perf_counter()
    t_down = time.perf_counter()
    watcher.stop.set()
    watcher.join()
    if not result.ok:
        raise SystemExit(f"deployment run failed: {result.status} {result.details}\n{result.log}")
    return {
        "startup": t_up - t0,
        "run_app": t_run - t_up,
        "teardown": t_down - t_run,
        "total": t_down - t0,
        "history": read_history(out),
        "final": load_file(str(out / "final.safetensors")),
        "processes": watcher.by_name(),
    }


def cold_clientapp_seconds(cfg_path: Path) -> float:
    """A fresh interpreter importing medfed's ClientApp and loading its site from the cache."""
    code = (
        "from medfed.config import load_config\n"
        "from medfed.runtime.flower.client import _federation_sites\n"
        f"_federation_sites(load_config({str(cfg_path)!r}).data.model_dump_json())\n"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- report


def _row(label: str, *cells: str) -> str:
    return f"{label:<34}" + "".join(f"{c:>14}" for c in cells)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import flwr

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, flwr {flwr.__version__}, "
        f"{os.cpu_count()} CPUs; {args.rounds} rounds, scale {args.scale}, "
        f"{args.image_size} px, {SITES} sites, medfed:smallcnn"
    )
    workdir = Path(tempfile.mkdtemp(prefix="medfed-flower-overhead-"))
    try:
        cfg_path = write_config(
            workdir, rounds=args.rounds, scale=args.scale, image_size=args.image_size
        )
        config = load_config(cfg_path)
        t0 = time.perf_counter()
        fed, _ = load_federation(config.data)  # fills the cache every SuperNode reads from
        print(
            f"data: {sum(len(s.train) for s in fed.sites)} train / "
            f"{sum(len(s.val) for s in fed.sites)} val images "
            f"({time.perf_counter() - t0:.1f} s to generate)"
        )

        t0, c0 = time.perf_counter(), time.process_time()
        ref = run(config, out_dir=workdir / "inproc", federation=fed, progress=False)
        inproc_total, inproc_cpu = time.perf_counter() - t0, time.process_time() - c0
        inproc_rows = read_history(workdir / "inproc")

        dep = deployment_run(workdir, cfg_path, fed, args.rounds)
        dep_rows = dep["history"]

        diff = 0.0
        for k, v in ref.final_params.items():
            if v.numel():
                diff = max(diff, (dep["final"][k].double() - v.double()).abs().max().item())

        sizes = message_sizes(config, cfg_path, fed, ref.final_params)
        cold = cold_clientapp_seconds(cfg_path)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- seconds
    print()
    print(_row("wall seconds", "in-process", "deployment", "overhead", "ratio"))
    for a, b in zip(inproc_rows, dep_rows, strict=True):
        s_a, s_b = a["seconds"], b["seconds"]
        print(
            _row(
                f"round {a['round']}",
                f"{s_a:.2f}",
                f"{s_b:.2f}",
                f"{s_b - s_a:+.2f}",
                f"{s_b / s_a:.1f}x",
            )
        )
    mean_a = statistics.mean(r["seconds"] for r in inproc_rows)
    mean_b = statistics.mean(r["seconds"] for r in dep_rows)
    print(
        _row(
            "mean per round",
            f"{mean_a:.2f}",
            f"{mean_b:.2f}",
            f"{mean_b - mean_a:+.2f}",
            f"{mean_b / mean_a:.1f}x",
        )
    )
    rounds_b = sum(r["seconds"] for r in dep_rows)
    print(
        _row(
            "whole run incl. start-up",
            f"{inproc_total:.2f}",
            f"{dep['total']:.2f}",
            f"{dep['total'] - inproc_total:+.2f}",
            f"{dep['total'] / inproc_total:.1f}x",
        )
    )
    print(
        f"  deployment up (SuperLink, 3 registrations, 3 SuperNodes online): {dep['startup']:.1f} s"
    )
    print(
        f"  flwr run until finished: {dep['run_app']:.1f} s, of which rounds {rounds_b:.1f} s and "
        f"packaging/ServerApp start/site discovery/status polling {dep['run_app'] - rounds_b:.1f} s"
    )
    print(f"  teardown: {dep['teardown']:.1f} s")
    n_msgs = SITES * 2 * args.rounds + SITES  # TRAIN + EVALUATE per site and round, + discovery
    procs = dep["processes"]
    dep_cpu = sum(c for _, c in procs.values())
    print(
        f"CPU seconds: in-process {inproc_cpu:.1f}, deployment {dep_cpu:.1f} "
        f"({dep_cpu / inproc_cpu:.1f}x; all its processes, sampled from /proc)"
    )
    for name, (n, cpu) in sorted(procs.items(), key=lambda x: -x[1][1]):
        print(f"  {name:<16} {n:>3} process(es) {cpu:>7.1f} s")
    print(
        f"  messages to sites: {n_msgs} (TRAIN + EVALUATE per site and round, + discovery); "
        f"cold start of one ClientApp-like process (interpreter + import medfed's ClientApp "
        f"+ load its site from the cache): {cold:.2f} s"
    )
    print(f"final parameters, max |delta param| in-process vs deployment: {diff:.1e}")

    # -- bytes
    print()
    print(_row("bytes per message (1 site)", "RecordDict pb", "flwr 1.41", "objects"))
    for name, s in sizes.items():
        print(_row(name, f"{s.proto:,}", f"{s.shipped:,}", f"{s.objects}"))
    per_round_payload = statistics.mean(r["bytes_up"] + r["bytes_down"] for r in dep_rows)
    per_round_proto = SITES * sum(s.proto for s in sizes.values())
    per_round_shipped = SITES * sum(s.shipped for s in sizes.values())
    print(
        _row("per round, 3 sites: payload", f"{per_round_payload:,.0f}", "", "")
        + "   (history bytes_up + bytes_down: tensors of TRAIN only)"
    )
    print(
        _row("per round, 3 sites: messages", f"{per_round_proto:,}", f"{per_round_shipped:,}", "")
    )
    print(
        f"message bytes / payload bytes: {per_round_shipped / per_round_payload:.2f} "
        "(SuperLink <-> SuperNodes; HTTP/TLS framing not included)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
