"""Peer comparison: the engine-overhead workload under Flower's simulation engine (Ray backend).

Same workload as ``engine_overhead.py`` (issue #2): N clients x M images 1x28x28, ``medfed:tinycnn``,
SGD lr 0.05 (no momentum), batch 32, 1 local epoch, 5 rounds of FedAvg, pooled validation accuracy
after every round (server-side ``evaluate_fn``). Each client's ``fit`` does exactly the plain loop's
arithmetic with the same per-(round, site) seeds. The printed ratio is the wall time of the whole
``run_simulation`` call (Ray start-up and shutdown included) / ``plain_run`` in the same process.

Needs the ``bench`` extra: ``pip install -e '.[bench]'`` (flwr[simulation], which pulls in Ray).

    python benchmarks/flower_peer.py                    # 10x500 and 50x100, 1 repeat
    python benchmarks/flower_peer.py --clients 10 --images 500 --repeats 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from engine_overhead import (  # noqa: E402
    ROUNDS,
    SEED,
    make_federation,
    new_model,
    plain_run,
    pooled_accuracy,
    train_site,
)
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from medfed.data.site import Federation  # noqa: E402
from medfed.seeding import derive_seed  # noqa: E402

NUM_CPUS = 2  # Ray's CPU budget: one actor per core (client_resources num_cpus=1)


def _get(model: torch.nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def _set(model: torch.nn.Module, params: list[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(p)) for k, p in zip(keys, params, strict=True)}
    )


def _worker_federation(clients: int, images: int) -> Federation:
    """Build the federation once per Ray worker process, deterministically (nothing is pickled)."""
    import engine_overhead

    cache: dict[tuple[int, int], Federation] = engine_overhead.__dict__.setdefault(
        "_flower_peer_cache", {}
    )
    if (clients, images) not in cache:
        cache[(clients, images)] = make_federation(clients, images)
    return cache[(clients, images)]


class PlainLoopClient(NumPyClient):
    """``fit`` is plain_run's inner loop for one site, line for line."""

    def __init__(self, fed: Federation, partition_id: int) -> None:
        self.site = fed.sites[partition_id]
        self.model = new_model()

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple:
        t_start = time.time()
        _set(self.model, parameters)
        n = train_site(self.model, self.site, int(config["round"]) - 1)
        return _get(self.model), n, {"t_start": t_start, "t_end": time.time()}


def make_client_app(clients: int, images: int) -> ClientApp:
    def client_fn(context: Context) -> Any:
        fed = _worker_federation(clients, images)
        return PlainLoopClient(fed, int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn)


def make_server_app(fed: Federation, log: dict[str, Any]) -> ServerApp:
    torch.manual_seed(derive_seed(SEED, "init"))
    init = _get(new_model())
    eval_model = new_model()
    clients = len(fed.sites)

    def evaluate_fn(server_round: int, params: list[np.ndarray], config: dict) -> Any:
        if server_round == 0:  # plain_run does not evaluate the initial model
            return None
        _set(eval_model, params)
        acc = pooled_accuracy(eval_model, fed)
        log["acc"], log["params"], log["t_last_eval"] = acc, params, time.time()
        return 0.0, {"acc": acc}

    def fit_metrics(metrics: list[tuple[int, dict]]) -> dict:
        log.setdefault("fit_starts", []).extend(m["t_start"] for _, m in metrics)
        log.setdefault("fit_ends", []).extend(m["t_end"] for _, m in metrics)
        return {}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_evaluate_clients=0,
            min_available_clients=clients,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda server_round: {"round": server_round},
            initial_parameters=ndarrays_to_parameters(init),
            fit_metrics_aggregation_fn=fit_metrics,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))

    return ServerApp(server_fn=server_fn)


def flower_run(fed: Federation, clients: int, images: int) -> tuple[float, dict[str, Any]]:
    log: dict[str, Any] = {}
    server_app = make_server_app(fed, log)
    client_app = make_client_app(clients, images)
    t0 = time.time()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "num_cpus": NUM_CPUS, "log_to_driver": False},
        },
    )
    t1 = time.time()
    log["startup"] = min(log["fit_starts"]) - t0  # call start -> first client starts training
    log["teardown"] = t1 - log["t_last_eval"]  # last evaluation -> call returns (Ray shutdown)
    return t1 - t0, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--images", type=int, nargs="*", default=[500, 100])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    import flwr
    import ray

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"flwr {flwr.__version__}, ray {ray.__version__} ({NUM_CPUS} CPUs, 1 per client actor)"
    )
    for clients, images in zip(args.clients, args.images, strict=False):
        fed = make_federation(clients, images)
        plain_run(fed)  # warm-up (allocator, kernels)
        ref, flw, startup, teardown, accs, diff = [], [], [], [], set(), 0.0
        for _ in range(args.repeats):
            (t_ref, _cpu), acc_ref, p_ref = plain_run(fed)  # wall time: Ray work is off-process
            t_flw, log = flower_run(fed, clients, images)
            assert not ray.is_initialized(), "Ray was left running"
            ref.append(t_ref)
            flw.append(t_flw)
            startup.append(log["startup"])
            teardown.append(log["teardown"])
            accs.add((round(acc_ref, 6), round(log["acc"], 6)))
            p_flw = dict(zip(p_ref, log["params"], strict=True))
            diff = max(diff, max(float(np.abs(p_ref[k].numpy() - p_flw[k]).max()) for k in p_ref))
        t_ref, t_flw = statistics.median(ref), statistics.median(flw)
        t_start, t_down = statistics.median(startup), statistics.median(teardown)
        print(
            f"{clients:>3} clients x {images} images: plain {t_ref:.2f}s  flower {t_flw:.2f}s  "
            f"ratio {t_flw / t_ref:.3f}  (start-up {t_start:.2f}s, shutdown {t_down:.2f}s; "
            f"without them {(t_flw - t_start - t_down) / t_ref:.3f})  "
            f"final acc plain/flower {sorted(accs)}  max |param diff| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
