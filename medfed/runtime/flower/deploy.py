"""Process wrappers and a loopback harness for Flower's deployment runtime (flwr 1.41).

Two layers:

* **Argument builders** (:class:`SuperLinkOptions`, :class:`SuperNodeOptions`,
  :func:`register_args`, :func:`run_args`, ...) that produce the exact ``argv`` lists for
  ``flower-superlink``, ``flower-supernode`` and the ``flwr`` CLI. TLS and SuperNode
  authentication are ON by default; ``insecure=True`` is an explicit opt-out that emits an
  :class:`InsecureDeploymentWarning` and a log record. These are what the
  ``medfed flower superlink|supernode|register|run`` wrappers build on.
* :class:`LocalDeployment`, a context manager that starts one SuperLink and N SuperNodes as
  subprocesses on 127.0.0.1 (free ports), registers the SuperNodes' public keys, waits until
  everything is ready, runs Flower Apps with ``flwr run`` and ALWAYS tears every process down
  (including the ``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` grandchildren),
  even when starting or running fails.

How flwr 1.41 is wired (found from the installed package and the CLIs' ``--help``)
----------------------------------------------------------------------------------
* The SuperLink serves the Runtime (ServerAppIo), Control and Fleet APIs on ONE HTTPS port
  (uvicorn): ``--host``/``--port`` (default 127.0.0.1:8000). ``--fleet-api-address`` and
  ``--control-api-address`` are deprecated no-ops for HTTP. The optional gRPC health server
  (``--health-server-address``) is plain-text, never TLS.
* TLS: ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``; the CA file is also handed to the
  SuperLink's own ``flower-superexec`` child, so the certificate must name 127.0.0.1.
  ``--enable-supernode-auth`` is refused together with ``--insecure``.
* In subprocess isolation the SuperLink starts ``flower-superexec`` **in a new session**
  (``start_new_session=True``), which starts ``flwr-serverapp``; each SuperNode starts a
  ``flower-superexec`` in its own process group, which starts ``flwr-clientapp``. They are
  found on ``PATH`` by name, so ``PATH`` must contain the venv's ``bin``. A SuperExec notices
  its parent's death only by polling, so teardown here kills whole process trees instead.
* Runtime dependency installation (``uv sync`` of the app's dependencies) is ON by default
  in the SuperLink (``--disable-runtime-dependency-installation`` turns it off) and OFF by
  default in the SuperNode (``--allow-runtime-dependency-installation`` turns it on). The
  builders here keep both off: the app's dependencies must already be installed.
* The ``flwr`` CLI no longer reads ``[tool.flwr.federations]`` from the app's pyproject: it
  reads *SuperLink connections* from ``$FLWR_HOME/config.toml`` (default ``~/.flwr``)::

      [superlink]
      default = "medfed"
      [superlink.medfed]
      address = "127.0.0.1:PORT"           # the SuperLink's --host:--port
      root-certificates = "/abs/ca.crt"

  and takes the connection name as the last positional argument
  (``flwr run APP_DIR medfed``, ``flwr supernode register KEY.pub medfed``). A legacy
  ``[tool.flwr.federations]`` section in an app is *migrated*, i.e. the CLI rewrites the
  app's pyproject.toml; keep that section out of apps run through here.
* ``flwr run ... --stream`` exits 0 even when the ServerApp fails; the run's real outcome is
  ``status`` in ``flwr list --run-id ID --format json`` (``finished:completed`` /
  ``finished:failed`` + ``status-details``). :meth:`LocalDeployment.run_app` polls that.
* An unregistered SuperNode key is refused at activation: the SuperNode exits (code 305)
  with ``[code: 2004] Failed to activate SuperNode.`` and never shows in
  ``flwr supernode list``. A SuperNode that does not trust the SuperLink's CA exits (305)
  with ``CERTIFICATE_VERIFY_FAILED``.

Command lines verified end to end with flwr 1.41.0 (tests/runtime/test_flower_deploy.py)
---------------------------------------------------------------------------------------
::

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt \
        --ssl-keyfile superlink.key --enable-supernode-auth --isolation subprocess \
        --disable-runtime-dependency-installation --host 127.0.0.1 --port 9093 \
        --health-server-address 127.0.0.1:9098
    FLWR_HOME=<dir with config.toml above> flwr supernode register supernode-1.pub medfed --format json
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
* A SuperExec detects its parent's death with ``os.kill(ppid, 0)``, which also succeeds on an
  unreaped zombie, so after its parent died it can linger for seconds; the teardown here
  does not rely on that and kills it directly.
* Descendant discovery reads ``/proc`` (Linux). Elsewhere only the process groups of the
  processes started here are signalled, which misses the SuperLink's SuperExec (new
  session); it then exits by itself once it notices its parent is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from medfed.types import StrEnum

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

CONNECTION_NAME = "medfed"
"""Name of the SuperLink connection medfed writes into ``$FLWR_HOME/config.toml``."""

LOOPBACK = "127.0.0.1"
FLOWER_CONFIG_FILE = "config.toml"
_TAIL_LINES = 25
_LIST_INTERVAL = 8.0
# flwr 1.41's SuperNode logs this once the SuperLink accepted it. A shortcut, not a contract:
# without it readiness falls back to `flwr supernode list`.
_ACTIVATED = re.compile(r"SuperNode ID: (\d+)")


class FlowerExecutable(StrEnum):
    SUPERLINK = "flower-superlink"
    SUPERNODE = "flower-supernode"
    CLI = "flwr"


class IsolationMode(StrEnum):
    SUBPROCESS = "subprocess"
    PROCESS = "process"


class OutputFormat(StrEnum):
    DEFAULT = "default"
    JSON = "json"


class RunStatus(StrEnum):
    """``status`` of ``flwr list --format json`` (``finished:<sub-status>``)."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "finished:completed"
    FAILED = "finished:failed"
    STOPPED = "finished:stopped"

    @property
    def finished(self) -> bool:
        return self.value.startswith("finished:")


class NodeStatus(StrEnum):
    """``status`` of ``flwr supernode list --format json``."""

    REGISTERED = "registered"
    ONLINE = "online"
    OFFLINE = "offline"
    UNREGISTERED = "unregistered"


class Env(StrEnum):
    FLWR_HOME = "FLWR_HOME"
    HOME = "HOME"
    PATH = "PATH"
    TELEMETRY = "FLWR_TELEMETRY_ENABLED"
    UPDATE_CHECK = "FLWR_DISABLE_UPDATE_CHECK"
    UNBUFFERED = "PYTHONUNBUFFERED"
    NO_COLOR = "NO_COLOR"


class InsecureDeploymentWarning(UserWarning):
    """TLS (and therefore SuperNode authentication) was switched off on purpose."""


class FlowerDeploymentError(RuntimeError):
    """A Flower process failed to start, connect or run; the message says why."""


def _warn_insecure(what: str) -> None:
    msg = (
        f"INSECURE: {what} runs WITHOUT TLS and without SuperNode authentication. Model "
        "updates travel in plain text and any process that reaches the port can join. "
        "Use this only on a trusted loopback for debugging, never across hospitals."
    )
    warnings.warn(msg, InsecureDeploymentWarning, stacklevel=3)
    logger.warning(msg)


# --------------------------------------------------------------------------- config values


ConfigValue = str | int | float | bool


def _toml_value(value: ConfigValue) -> str:
    # bool before int: bool is an int subclass.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"unsupported config value {value!r} ({type(value).__name__})")


_CONFIG_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """``{"partition-id": 0, "name": "a b"}`` -> ``partition-id=0 name="a b"``.

    The format Flower parses for ``--node-config`` and ``flwr run --run-config`` (TOML
    values separated by spaces).
    """
    parts = []
    for key, value in values.items():
        if not _CONFIG_KEY.fullmatch(key):
            raise ValueError(f"config key {key!r} must match {_CONFIG_KEY.pattern}")
        parts.append(f"{key}={_toml_value(value)}")
    return " ".join(parts)


# --------------------------------------------------------------------------- argv builders


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS material; ``ca_cert`` alone is what SuperNodes and the CLI need."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def missing(self) -> list[Path]:
        return [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]


def _require_files(paths: Mapping[str, Path | None]) -> None:
    missing = [f"{flag} {path}" for flag, path in paths.items() if path and not path.is_file()]
    if missing:
        raise FlowerDeploymentError(
            "missing certificate/key file(s): " + "; ".join(missing) + ". Generate them with "
            "medfed.runtime.flower.certs.generate_dev_certificates (development) or get them "
            "from the federation's operator."
        )


@dataclass(frozen=True)
class SuperLinkOptions:
    """``flower-superlink`` arguments. TLS + SuperNode auth unless ``insecure=True``."""

    tls: TlsFiles | None = None
    host: str = LOOPBACK
    port: int = 9093
    health_address: str | None = None
    database: Path | None = None  # None: in-memory state
    isolation: IsolationMode = IsolationMode.SUBPROCESS
    enable_supernode_auth: bool = True
    runtime_dependency_installation: bool = False
    log_file: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure:
            if self.enable_supernode_auth:
                raise ValueError(
                    "SuperNode authentication needs TLS; pass enable_supernode_auth=False "
                    "together with insecure=True"
                )
        elif self.tls is None:
            raise ValueError(
                "a SuperLink needs TLS files (tls=TlsFiles(...)); insecure=True is the "
                "explicit, loudly-warned opt-out"
            )

    @property
    def address(self) -> str:
        """Fleet + Control + Runtime API address that SuperNodes and the CLI dial."""
        return f"{self.host}:{self.port}"

    def require_files(self) -> None:
        if self.tls is not None and not self.insecure:
            _require_files(
                {
                    "--ssl-ca-certfile": self.tls.ca_cert,
                    "--ssl-certfile": self.tls.server_cert,
                    "--ssl-keyfile": self.tls.server_key,
                }
            )

    def args(self, executable: str | Path = FlowerExecutable.SUPERLINK) -> list[str]:
        argv = [str(executable)]
        if self.insecure:
            _warn_insecure("the SuperLink")
            argv.append("--insecure")
        else:
            assert self.tls is not None  # __post_init__
            argv += [
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
            ]  # fmt: skip
        if self.enable_supernode_auth:
            argv.append("--enable-supernode-auth")
        argv += ["--isolation", str(self.isolation)]
        if not self.runtime_dependency_installation:
            argv.append("--disable-runtime-dependency-installation")
        argv += ["--host", self.host, "--port", str(self.port)]
        if self.health_address:
            argv += ["--health-server-address", self.health_address]
        if self.database is not None:
            argv += ["--database", str(self.database)]
        if self.log_file is not None:
            argv += ["--log-file", str(self.log_file)]
        return argv


@dataclass(frozen=True)
class SuperNodeOptions:
    """``flower-supernode`` arguments. TLS + node auth unless ``insecure=True``."""

    superlink: str  # the SuperLink's host:port (no scheme)
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    node_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    host: str = LOOPBACK  # this SuperNode's Runtime (ClientAppIo) HTTP API
    port: int = 9094
    health_address: str | None = None
    isolation: IsolationMode = IsolationMode.SUBPROCESS
    max_retries: int | None = None
    max_wait_time: float | None = None
    runtime_dependency_installation: bool = False
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure:
            if self.root_certificates is not None:
                raise ValueError("insecure=True contradicts root_certificates")
            return
        if self.root_certificates is None:
            # Flower would silently fall back to the system CA bundle; a federation always
            # pins its own CA, so make the choice explicit.
            raise ValueError(
                "a SuperNode needs the federation's CA certificate (root_certificates=...); "
                "insecure=True is the explicit, loudly-warned opt-out"
            )
        if self.auth_private_key is None:
            raise ValueError("a SuperNode needs its private key (auth_private_key=...)")

    def require_files(self) -> None:
        if not self.insecure:
            _require_files(
                {
                    "--root-certificates": self.root_certificates,
                    "--auth-supernode-private-key": self.auth_private_key,
                }
            )

    def args(self, executable: str | Path = FlowerExecutable.SUPERNODE) -> list[str]:
        argv = [str(executable)]
        if self.insecure:
            _warn_insecure("the SuperNode")
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.root_certificates)]
        if self.auth_private_key is not None:
            argv += ["--auth-supernode-private-key", str(self.auth_private_key)]
        argv += ["--superlink", self.superlink]
        if self.node_config:
            argv += ["--node-config", format_config(self.node_config)]
        argv += ["--isolation", str(self.isolation), "--host", self.host, "--port", str(self.port)]
        if self.health_address:
            argv += ["--health-server-address", self.health_address]
        if self.max_retries is not None:
            argv += ["--max-retries", str(self.max_retries)]
        if self.max_wait_time is not None:
            argv += ["--max-wait-time", str(self.max_wait_time)]
        if self.runtime_dependency_installation:
            argv.append("--allow-runtime-dependency-installation")
        return argv


@dataclass(frozen=True)
class SuperLinkConnection:
    """One ``[superlink.<name>]`` entry of ``$FLWR_HOME/config.toml`` for the ``flwr`` CLI."""

    address: str
    root_certificates: Path | None = None
    name: str = CONNECTION_NAME
    insecure: bool = False

    def __post_init__(self) -> None:
        if not self.insecure and self.root_certificates is None:
            raise ValueError("a SuperLink connection needs root_certificates (or insecure=True)")

    def toml(self) -> str:
        lines = ["[superlink]", f"default = {json.dumps(self.name)}", ""]
        lines.append(f"[superlink.{self.name}]")
        lines.append(f"address = {json.dumps(self.address)}")
        if self.insecure:
            _warn_insecure("the flwr CLI connection")
            lines.append("insecure = true")
        else:
            ca = Path(str(self.root_certificates)).resolve()  # the CLI may run from another cwd
            lines.append(f"root-certificates = {json.dumps(str(ca))}")
        return "\n".join(lines) + "\n"

    def write(self, flwr_home: Path) -> Path:
        """Write ``flwr_home/config.toml`` (replacing it: the dir is medfed's own)."""
        if self.root_certificates is not None:
            _require_files({"root-certificates": self.root_certificates})
        flwr_home.mkdir(parents=True, exist_ok=True)
        path = flwr_home / FLOWER_CONFIG_FILE
        path.write_text(self.toml(), encoding="utf-8")
        return path


def _cli(executable: str | Path | None) -> str:
    return str(executable or FlowerExecutable.CLI)


def register_args(
    public_key: Path,
    connection: str = CONNECTION_NAME,
    *,
    name: str | None = None,
    json_output: bool = True,
    executable: str | Path | None = None,
) -> list[str]:
    """``flwr supernode register KEY.pub CONNECTION [--name N] --format json``."""
    argv = [_cli(executable), "supernode", "register", str(public_key), connection]
    if name:
        argv += ["--name", name]
    if json_output:
        argv += ["--format", str(OutputFormat.JSON)]
    return argv


def list_nodes_args(
    connection: str = CONNECTION_NAME, *, executable: str | Path | None = None
) -> list[str]:
    return [_cli(executable), "supernode", "list", connection, "--format", str(OutputFormat.JSON)]


def run_args(
    app_dir: Path,
    connection: str = CONNECTION_NAME,
    *,
    run_config: Mapping[str, ConfigValue] | None = None,
    stream: bool = False,
    json_output: bool = True,
    executable: str | Path | None = None,
) -> list[str]:
    """``flwr run APP_DIR CONNECTION [--run-config 'k=v ...'] [--stream] [--format json]``."""
    argv = [_cli(executable), "run", str(app_dir), connection]
    if run_config:
        argv += ["--run-config", format_config(run_config)]
    if stream:
        argv.append("--stream")
    if json_output:
        argv += ["--format", str(OutputFormat.JSON)]
    return argv


def list_runs_args(
    run_id: int, connection: str = CONNECTION_NAME, *, executable: str | Path | None = None
) -> list[str]:
    return [
        _cli(executable), "list", connection, "--run-id", str(run_id),
        "--format", str(OutputFormat.JSON),
    ]  # fmt: skip


def run_log_args(
    run_id: int, connection: str = CONNECTION_NAME, *, executable: str | Path | None = None
) -> list[str]:
    return [_cli(executable), "log", str(run_id), connection, "--show"]


# --------------------------------------------------------------------------- environment


def flower_bin_dir() -> Path:
    """The directory holding this interpreter's Flower executables (the venv's ``bin``)."""
    return Path(sys.executable).parent


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower subprocess confined to ``flwr_home``.

    ``FLWR_HOME`` and ``HOME`` both point into ``flwr_home`` so nothing touches the user's
    ``~/.flwr`` (config, installed FABs, credentials); telemetry and the PyPI update check are
    off; ``PATH`` starts with the venv's ``bin`` because Flower starts ``flower-superexec``,
    ``flwr-serverapp`` and ``flwr-clientapp`` by name.
    """
    env = dict(os.environ if base is None else base)
    flwr_home.mkdir(parents=True, exist_ok=True)
    env[Env.FLWR_HOME] = str(flwr_home)
    env[Env.HOME] = str(flwr_home)
    env[Env.PATH] = os.pathsep.join([str(flower_bin_dir()), env.get(Env.PATH, "")])
    env[Env.TELEMETRY] = "0"
    env[Env.UPDATE_CHECK] = "1"
    env[Env.UNBUFFERED] = "1"
    env[Env.NO_COLOR] = "1"
    return env


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- error translation


class FlowerErrorKind(StrEnum):
    MISSING_FILE = "missing-file"
    UNREACHABLE = "unreachable"
    TLS_UNTRUSTED = "tls-untrusted"
    UNREGISTERED_KEY = "unregistered-key"
    KEY_IN_USE = "key-in-use"
    PORT_IN_USE = "port-in-use"
    SERVERAPP_FAILED = "serverapp-failed"


@dataclass(frozen=True)
class FlowerProblem:
    kind: FlowerErrorKind
    message: str
    evidence: str  # the raw line that matched


# Order matters: the first match wins (a TLS failure also prints "could not establish a
# connection", so the specific causes come before the generic unreachable one).
_PATTERNS: tuple[tuple[FlowerErrorKind, re.Pattern[str], str], ...] = (
    (
        FlowerErrorKind.MISSING_FILE,
        re.compile(
            r"Path argument `(--[\w-]+)` does not point to a file"
            r"|Failed to read certificate file `([^`]+)`"
            r"|Public key file '([^']+)' does not exist"
        ),
        "a certificate/key file does not exist: {detail}",
    ),
    (
        FlowerErrorKind.TLS_UNTRUSTED,
        re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error"),
        "TLS verification failed: the SuperLink's certificate is not signed by the CA given "
        "with --root-certificates (wrong/missing CA file), or it does not name the address "
        "dialled",
    ),
    (
        FlowerErrorKind.UNREGISTERED_KEY,
        re.compile(r"Failed to activate SuperNode|\[code: 2004\]"),
        "the SuperLink refused this SuperNode: its public key is not registered (run "
        "`flwr supernode register KEY.pub` against the SuperLink first) or was unregistered",
    ),
    (
        FlowerErrorKind.KEY_IN_USE,
        re.compile(r"Public key already in use"),
        "this public key is already registered with the SuperLink",
    ),
    (
        FlowerErrorKind.PORT_IN_USE,
        re.compile(r"address already in use|Errno 98", re.IGNORECASE),
        "a port is already taken by another process",
    ),
    (
        FlowerErrorKind.UNREACHABLE,
        re.compile(
            r"Connection refused|Connection to the SuperLink is unavailable"
            r"|Giving up reconnection|could not establish a connection"
        ),
        "the SuperLink is unreachable at the configured address (not running, wrong "
        "host/port, or a firewall in between)",
    ),
    (
        FlowerErrorKind.SERVERAPP_FAILED,
        re.compile(r"ServerApp raised an exception|ServerApp failed with exception"),
        "the ServerApp raised an exception (see the run log)",
    ),
)


def diagnose_flower_error(raw: str) -> FlowerProblem | None:
    """Recognise a known Flower failure in raw stderr/CLI output, or ``None``."""
    for kind, pattern, template in _PATTERNS:
        for line in raw.splitlines():
            m = pattern.search(line)
            if m:
                detail = next((g for g in m.groups() if g), line.strip())
                return FlowerProblem(kind, template.format(detail=detail), line.strip())
    return None


def explain_flower_error(raw: str, *, context: str) -> str:
    """One clear message for Flower's raw output, quoting the tail of the raw text."""
    problem = diagnose_flower_error(raw)
    tail = "\n".join(raw.strip().splitlines()[-_TAIL_LINES:])
    head = f"{context}: {problem.message}" if problem else f"{context} failed"
    return f"{head}\n--- last output ---\n{tail}" if tail else head


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _ProcId:
    """A pid plus its start time, so a recycled pid is never signalled."""

    pid: int
    start: int
    pgid: int


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, starttime) from /proc/PID/stat, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    # fields[0] = state (field 3), [1] = ppid, [2] = pgrp, [19] = starttime (field 22)
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _alive(proc: _ProcId) -> bool:
    stat = _proc_stat(proc.pid)
    if stat is None:
        if Path("/proc").is_dir():
            return False
        try:  # no /proc: best effort
            os.kill(proc.pid, 0)
        except OSError:
            return False
        return True
    state, _, _, start = stat
    return start == proc.start and state not in ("Z", "X")


def _descendants(root: int) -> list[_ProcId]:
    """Live descendants of ``root`` (any session) and live members of its process group, from
    /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, int, int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                info[int(entry)] = stat
                children.setdefault(stat[1], []).append(int(entry))
    out: list[_ProcId] = []
    # Members of root's own process group too (every process here is a group leader): they
    # stay findable after root exited and they were re-parented to init (e.g. the SuperExec
    # of a SuperNode that was refused and quit by itself).
    stack = list(children.get(root, []))
    stack += [pid for pid, st in info.items() if st[2] == root and pid != root]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        state, _, pgid, start = info[pid]
        if state not in ("Z", "X"):
            out.append(_ProcId(pid, start, pgid))
        stack.extend(children.get(pid, []))
    return out


def _identify(pid: int) -> _ProcId:
    stat = _proc_stat(pid)
    if stat is None:
        return _ProcId(pid, -1, pid)
    return _ProcId(pid, stat[3], stat[2])


def _signal(procs: Sequence[_ProcId], sig: signal.Signals) -> None:
    own_pgid = os.getpgrp()
    groups = {p.pgid for p in procs if p.pgid > 1 and p.pgid != own_pgid}
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
    for p in procs:
        if p.pid > 1 and p.pid != os.getpid() and _alive(p):
            with contextlib.suppress(OSError):
                os.kill(p.pid, sig)


@dataclass
class ManagedProcess:
    """A Flower process started here, in its own session, output going to ``log_path``."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    _ident: _ProcId | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = _TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; raise if it is still up after ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise FlowerDeploymentError(
                f"{self.name} (pid {self.pid}) still running after {timeout:.0f}s\n"
                f"--- last output ---\n{self.tail()}"
            ) from err

    def tree(self) -> list[_ProcId]:
        """This process and its live descendants (SuperExec, flwr-serverapp/-clientapp)."""
        if self._ident is None:
            self._ident = _identify(self.pid)
        root = [self._ident] if _alive(self._ident) else []
        return root + _descendants(self.pid)

    def failure(self, context: str) -> FlowerDeploymentError:
        code = self.popen.poll()
        status = f"exited with code {code}" if code is not None else "is running"
        msg = explain_flower_error(self.output(), context=f"{context} ({self.name} {status})")
        return FlowerDeploymentError(msg)


def _spawn(name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(log_path.parent),
            start_new_session=True,  # own process group: killpg reaches its children
        )
    proc = ManagedProcess(name, argv, popen, log_path)
    proc._ident = _identify(popen.pid)
    return proc


def terminate_all(procs: Sequence[ManagedProcess], grace: float = 5.0) -> list[int]:
    """SIGTERM every process tree, wait ``grace`` s, SIGKILL the rest; return survivors' pids.

    Trees are collected BEFORE signalling: once a parent dies its children are re-parented
    to init and can no longer be found from it.
    """
    trees: list[_ProcId] = []
    for proc in procs:
        trees.extend(proc.tree())
    _signal(trees, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        # A dying SuperExec may still start a child; pick those up too.
        for proc in procs:
            trees.extend(d for d in _descendants(proc.pid) if d not in trees)
        if not any(_alive(p) for p in trees):
            break
        time.sleep(0.1)
    leftover = [p for p in trees if _alive(p)]
    if leftover:
        logger.warning("killing Flower processes that ignored SIGTERM: %s", leftover)
        _signal(leftover, signal.SIGKILL)
    for proc in procs:  # reap our direct children
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5.0)
    time.sleep(0.05)
    return [p.pid for p in trees if _alive(p)]


# --------------------------------------------------------------------------- CLI calls


@dataclass(frozen=True)
class CliResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"{self.stdout}\n{self.stderr}".strip()

    def json(self) -> dict[str, object]:
        """The JSON object in stdout (the CLI may print a banner line before it)."""
        start = self.stdout.find("{")
        if start < 0:
            raise ValueError(f"no JSON in output of {' '.join(self.argv)}:\n{self.output}")
        obj = json.JSONDecoder().raw_decode(self.stdout[start:])[0]
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object from {' '.join(self.argv)}")
        return obj


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _run_cli(argv: list[str], env: Mapping[str, str], timeout: float) -> CliResult:
    try:
        cp = subprocess.run(
            argv,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as err:
        out = "\n".join(_text(x) for x in (err.stdout, err.stderr))
        raise FlowerDeploymentError(
            explain_flower_error(out, context=f"`{' '.join(argv)}` timed out")
        ) from err
    return CliResult(argv, cp.returncode, cp.stdout, cp.stderr)


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
