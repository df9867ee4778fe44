"""A loopback harness for Flower's deployment runtime (flwr 1.41): :class:`LocalDeployment`.

:class:`LocalDeployment` is a context manager that starts one SuperLink and N SuperNodes as
subprocesses on 127.0.0.1 (free ports), registers the SuperNodes' public keys, waits until
everything is ready, runs Flower Apps with ``flwr run`` and ALWAYS tears every process down
(including the ``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` grandchildren),
even when starting or running fails.

It is built from three layers, each in its own module; their public names are re-exported here,
so ``from medfed.runtime.flower.deploy import ...`` keeps working:

* :mod:`medfed.runtime.flower.deploy_args`: the exact ``argv`` lists for ``flower-superlink``,
  ``flower-supernode`` and the ``flwr`` CLI (secure by default), and how flwr 1.41 is wired.
  These are what the ``medfed flower superlink|supernode|register|run`` wrappers build on.
* :mod:`medfed.runtime.flower.deploy_processes`: a Flower subprocess's environment, starting it,
  tearing its whole process tree down, one-shot ``flwr`` CLI calls.
* :mod:`medfed.runtime.flower.deploy_errors`: Flower's raw output -> one clear message.

How a run's outcome is read
---------------------------
* ``flwr run ... --stream`` exits 0 even when the ServerApp fails; the run's real outcome is
  ``status`` in ``flwr list --run-id ID --format json`` (``finished:completed`` /
  ``finished:failed`` + ``status-details``). :meth:`LocalDeployment.run_app` polls that.

Command lines verified end to end with flwr 1.41.0 (tests/runtime/test_flower_deploy.py)
---------------------------------------------------------------------------------------
::

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt \
        --ssl-keyfile superlink.key --enable-supernode-auth --isolation subprocess \
        --disable-runtime-dependency-installation --host 127.0.0.1 --port 9093 \
        --health-server-address 127.0.0.1:9098
    FLWR_HOME=<dir with config.toml> flwr supernode register supernode-1.pub medfed --format json
    flower-supernode --root-certificates ca.crt --auth-supernode-private-key supernode-1 \
        --superlink 127.0.0.1:9093 --node-config 'number=1 site="hospital-0"' \
        --isolation subprocess --host 127.0.0.1 --port 9094 --health-server-address 127.0.0.1:9095
    FLWR_HOME=... flwr run APP_DIR medfed --run-config 'k=1 s="x"' --stream --format json
    FLWR_HOME=... flwr list medfed --run-id RUN_ID --format json   # the run's real outcome

Limitations
-----------
* Cost on a 2-core machine: every ``flwr`` CLI call spends ~1.5-2 s importing; SuperLink
  start ~3 s; 3 SuperNodes online ~10 s after it; a 3-node round of the test app ~15-20 s
  (each ``flwr-clientapp`` is a fresh interpreter). Readiness therefore uses the SuperNodes'
  ``SuperNode ID: <id>`` log line first and ``flwr supernode list`` only as a fallback.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from medfed.runtime.flower.deploy_args import (
    CONNECTION_NAME,
    LOOPBACK,
    ConfigValue,
    FlowerExecutable,
    InsecureDeploymentWarning,
    IsolationMode,
    NodeStatus,
    RunStatus,
    SuperLinkConnection,
    SuperLinkOptions,
    SuperNodeOptions,
    TlsFiles,
    format_config,
    list_nodes_args,
    list_runs_args,
    register_args,
    run_args,
    run_log_args,
)
from medfed.runtime.flower.deploy_errors import (
    FlowerDeploymentError,
    FlowerErrorKind,
    FlowerProblem,
    diagnose_flower_error,
    explain_flower_error,
)
from medfed.runtime.flower.deploy_processes import (
    CliResult,
    ManagedProcess,
    _alive,
    _run_cli,
    _signal,
    _spawn,
    flower_bin_dir,
    flower_env,
    free_ports,
    terminate_all,
)

__all__ = [
    "CONNECTION_NAME",
    "FlowerDeploymentError",
    "FlowerErrorKind",
    "FlowerExecutable",
    "FlowerProblem",
    "InsecureDeploymentWarning",
    "IsolationMode",
    "LocalDeployment",
    "ManagedProcess",
    "NodeSpec",
    "NodeStatus",
    "RunResult",
    "RunStatus",
    "SuperLinkConnection",
    "SuperLinkOptions",
    "SuperNodeOptions",
    "TlsFiles",
    "diagnose_flower_error",
    "explain_flower_error",
    "flower_env",
    "format_config",
    "free_ports",
    "list_nodes_args",
    "list_runs_args",
    "register_args",
    "run_args",
    "run_log_args",
]

logger = logging.getLogger(__name__)


_LIST_INTERVAL = 8.0
# flwr 1.41's SuperNode logs this once the SuperLink accepted it. A shortcut, not a contract:
# without it readiness falls back to `flwr supernode list`.
_ACTIVATED = re.compile(r"SuperNode ID: (\d+)")


# --------------------------------------------------------------------------- local deployment


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode of a :class:`LocalDeployment`."""

    private_key: Path
    public_key: Path
    node_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    register: bool = True
    root_certificates: Path | None = None  # None: the deployment's CA
    name: str | None = None


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: RunStatus
    details: str
    log: str

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.COMPLETED


def _wait_tcp(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _health_serving(address: str, timeout: float) -> bool:
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:  # pragma: no cover - both ship with flwr
        return True
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


class LocalDeployment:
    """A SuperLink + N SuperNodes on 127.0.0.1 with TLS and SuperNode auth, torn down on exit.

    >>> with LocalDeployment(workdir, tls=tls, nodes=[NodeSpec(k, k_pub, {"number": 1})]) as d:
    ...     result = d.run_app(app_dir, run_config={"result-path": "/tmp/r.json"})

    Every process gets its own ``FLWR_HOME`` under ``workdir`` (``superlink/``, ``node-<i>/``,
    ``cli/``) and writes its output to ``workdir/logs/<name>.log``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        tls: TlsFiles,
        nodes: Sequence[NodeSpec] = (),
        startup_timeout: float = 30.0,
        cli_timeout: float = 60.0,
        teardown_grace: float = 5.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.tls = tls
        self.node_specs = list(nodes)
        self.startup_timeout = startup_timeout
        self.cli_timeout = cli_timeout
        self.teardown_grace = teardown_grace
        self.processes: list[ManagedProcess] = []
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[ManagedProcess] = []
        self.node_ids: dict[int, int] = {}  # node index -> SuperLink node id
        self.survivors: list[int] = []
        port, health = free_ports(2)
        self.superlink_options = SuperLinkOptions(
            tls=tls, port=port, health_address=f"{LOOPBACK}:{health}"
        )
        self.connection = SuperLinkConnection(
            address=self.superlink_options.address, root_certificates=tls.ca_cert
        )
        self._cli_home = self.workdir / "cli"
        self._node_count = 0

    # -- lifecycle

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        self.superlink_options.require_files()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.superlink = self._spawn(
            "superlink", self.superlink_options.args(self._exe(FlowerExecutable.SUPERLINK))
        )
        self._wait_superlink()
        self.connection.write(self._cli_home)
        to_register = [(i, s) for i, s in enumerate(self.node_specs) if s.register]
        for i, node_id in self._register_many(to_register):
            self.node_ids[i] = node_id
        for spec in self.node_specs:
            self.start_supernode(spec)
        self.wait_online(list(self.node_ids.values()))

    def close(self) -> None:
        """Terminate every process (trees included); idempotent."""
        if self.processes:
            self.survivors = terminate_all(self.processes, grace=self.teardown_grace)
            if self.survivors:
                logger.error("Flower processes survived teardown: %s", self.survivors)

    def all_pids(self) -> list[int]:
        """Pids of every process started here and their live descendants (for leak checks)."""
        return sorted({p.pid for proc in self.processes for p in proc.tree()})

    # -- pieces

    def _exe(self, exe: FlowerExecutable) -> str:
        path = flower_bin_dir() / str(exe)
        return str(path) if path.exists() else (shutil.which(str(exe)) or str(exe))

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        home = self.workdir / name
        proc = _spawn(name, argv, flower_env(home), self.workdir / "logs" / f"{name}.log")
        self.processes.append(proc)
        return proc

    def _wait_superlink(self) -> None:
        assert self.superlink is not None
        opts = self.superlink_options
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.superlink.running():
                raise self.superlink.failure("SuperLink did not start")
            health_ok = opts.health_address is None or _health_serving(opts.health_address, 1.0)
            if health_ok and _wait_tcp(opts.host, opts.port, 1.0):
                return
            time.sleep(0.2)
        raise FlowerDeploymentError(
            f"SuperLink not ready after {self.startup_timeout:.0f}s on {opts.address}\n"
            f"--- last output ---\n{self.superlink.tail()}"
        )

    def cli(
        self,
        argv: list[str],
        *,
        check: bool = True,
        what: str = "flwr",
        timeout: float | None = None,
    ) -> CliResult:
        """Run a ``flwr`` CLI command against this deployment's connection."""
        result = _run_cli(argv, flower_env(self._cli_home), timeout or self.cli_timeout)
        if check and result.returncode != 0:
            raise FlowerDeploymentError(explain_flower_error(result.output, context=what))
        return result

    def register(self, public_key: Path, *, name: str | None = None) -> int:
        """``flwr supernode register``; returns the node id the SuperLink assigned."""
        argv = register_args(public_key, self.connection.name, name=name, executable=self._flwr)
        res = self.cli(argv, what=f"registering {public_key.name}").json()
        return int(str(res["node-id"]))

    def _register_many(self, items: list[tuple[int, NodeSpec]]) -> Iterator[tuple[int, int]]:
        # Each `flwr` call spends ~1.5 s importing; run them side by side.
        with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
            futures = [(i, pool.submit(self.register, s.public_key, name=s.name)) for i, s in items]
            for i, fut in futures:
                yield i, fut.result()

    @property
    def _flwr(self) -> str:
        return self._exe(FlowerExecutable.CLI)

    def supernode_options(self, spec: NodeSpec, **overrides: object) -> SuperNodeOptions:
        port, health = free_ports(2)
        kwargs: dict[str, object] = {
            "superlink": self.superlink_options.address,
            "root_certificates": spec.root_certificates or self.tls.ca_cert,
            "auth_private_key": spec.private_key,
            "node_config": dict(spec.node_config),
            "port": port,
            "health_address": f"{LOOPBACK}:{health}",
        }
        kwargs.update(overrides)
        return SuperNodeOptions(**kwargs)  # type: ignore[arg-type]

    def start_supernode(self, spec: NodeSpec, **overrides: object) -> ManagedProcess:
        """Start one SuperNode (not waiting for it). ``overrides`` go to SuperNodeOptions."""
        opts = self.supernode_options(spec, **overrides)
        opts.require_files()
        name = f"node-{self._node_count}"
        self._node_count += 1
        proc = self._spawn(name, opts.args(self._exe(FlowerExecutable.SUPERNODE)))
        self.supernodes.append(proc)
        return proc

    def stop_supernode(
        self, index: int, *, sig: signal.Signals = signal.SIGKILL, timeout: float = 10.0
    ) -> list[int]:
        """Stop SuperNode ``index`` (start order) with its whole tree (SuperExec, ClientApps);
        SIGKILL by default, i.e. a crash: no goodbye to the SuperLink. Returns the pids
        signalled; raises if one is still alive after ``timeout`` s."""
        proc = self.supernodes[index]
        tree = proc.tree()
        _signal(tree, sig)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in tree):
            if time.monotonic() > deadline:
                alive = [p.pid for p in tree if _alive(p)]
                raise FlowerDeploymentError(f"{proc.name}: pids {alive} survived {sig.name}")
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=timeout)  # reap it
        return [p.pid for p in tree]

    def nodes(self) -> list[dict[str, object]]:
        """``flwr supernode list --format json`` -> the ``nodes`` entries."""
        res = self.cli(list_nodes_args(self.connection.name, executable=self._flwr)).json()
        nodes = res.get("nodes", [])
        return list(nodes) if isinstance(nodes, list) else []

    def online_node_ids(self) -> set[int]:
        return {
            int(str(n["node-id"])) for n in self.nodes() if n.get("status") == NodeStatus.ONLINE
        }

    def wait_online(self, node_ids: Sequence[int], timeout: float | None = None) -> None:
        """Wait until every registered SuperNode started here is accepted by the SuperLink.

        A SuperNode logs ``SuperNode ID: <id>`` once the SuperLink activated it; when every
        id in ``node_ids`` appears in those logs no further check is made. Otherwise
        ``flwr supernode list`` (~2 s of CPU per call) is asked every
        :data:`_LIST_INTERVAL` seconds. A watched SuperNode that exits fails the wait with
        its translated error.
        """
        limit = timeout or self.startup_timeout
        deadline = time.monotonic() + limit
        want = set(node_ids)
        online: set[int] = set()
        watched = [
            self.supernodes[i]
            for i, spec in enumerate(self.node_specs)
            if spec.register and i < len(self.supernodes)
        ]
        last_list = time.monotonic()
        while True:
            for proc in watched:
                if not proc.running():
                    raise proc.failure("SuperNode exited before coming online")
            logged = {int(m) for p in watched for m in _ACTIVATED.findall(p.output())}
            if want <= logged:
                return
            if time.monotonic() - last_list >= _LIST_INTERVAL:
                online = self.online_node_ids()
                last_list = time.monotonic()
                if want <= online:
                    return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        missing = sorted(want - online - logged)
        tails = "\n".join(f"--- {p.name} ---\n{p.tail(10)}" for p in watched if p.running())
        raise FlowerDeploymentError(f"SuperNodes {missing} not online after {limit:.0f}s\n{tails}")

    def run_app(
        self,
        app_dir: Path,
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout: float = 120.0,
    ) -> RunResult:
        """``flwr run --stream`` the app, then read the run's final status.

        ``--stream`` makes ``flwr run`` block until the run is finished, but it exits 0 even
        when the ServerApp failed, so the outcome comes from ``flwr list --run-id``. Does not
        raise when the ServerApp fails: check ``RunResult.ok`` / ``.status``; the run's log is
        fetched (``flwr log --show``) only then.
        """
        deadline = time.monotonic() + timeout
        argv = run_args(
            app_dir, self.connection.name, run_config=run_config, stream=True, executable=self._flwr
        )
        started = self.cli(argv, what=f"running {app_dir.name}", timeout=timeout).json()
        run_id = int(str(started["run-id"]))
        status: RunStatus | None = None
        details = ""
        while True:
            listing = self.cli(list_runs_args(run_id, self.connection.name, executable=self._flwr))
            runs = listing.json().get("runs", [])
            if isinstance(runs, list) and runs:
                run = runs[0]
                status = RunStatus(str(run["status"]))
                details = str(run.get("status-details", ""))
                if status.finished:
                    break
            if self.superlink is not None and not self.superlink.running():
                raise self.superlink.failure(f"SuperLink died during run {run_id}")
            if time.monotonic() > deadline:
                raise FlowerDeploymentError(
                    f"run {run_id} not finished after {timeout:.0f}s (last status {status})"
                )
            time.sleep(1.0)
        log = "" if status is RunStatus.COMPLETED else self.run_log(run_id)
        return RunResult(run_id, status, details, log)

    def run_log(self, run_id: int) -> str:
        """The run's log as ``flwr log RUN_ID --show`` prints it."""
        argv = run_log_args(run_id, self.connection.name, executable=self._flwr)
        return self.cli(argv, check=False).output
