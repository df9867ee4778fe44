"""``argv`` builders for Flower's deployment executables (flwr 1.41); they start no process.

Why a module of its own: the exact flags for ``flower-superlink``, ``flower-supernode`` and the
``flwr`` CLI are pure functions of typed options (:class:`SuperLinkOptions`,
:class:`SuperNodeOptions`, :func:`register_args`, :func:`run_args`, ...), shared by the
``medfed flower superlink|supernode|register|run`` wrappers (one executable in the foreground)
and by :class:`~medfed.runtime.flower.deploy.LocalDeployment` (a whole loopback federation);
kept apart from subprocesses, they can be checked without starting anything. TLS and SuperNode
authentication are ON by default; ``insecure=True`` is an explicit opt-out that emits an
:class:`InsecureDeploymentWarning` and a log record.

How flwr 1.41 is wired (found from the installed package and the CLIs' ``--help``)
----------------------------------------------------------------------------------
* The SuperLink serves the Runtime (ServerAppIo), Control and Fleet APIs on ONE HTTPS port
  (uvicorn): ``--host``/``--port`` (default 127.0.0.1:8000). ``--fleet-api-address`` and
  ``--control-api-address`` are deprecated no-ops for HTTP. The optional gRPC health server
  (``--health-server-address``) is plain-text, never TLS.
* TLS: ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``; the CA file is also handed to the
  SuperLink's own ``flower-superexec`` child, so the certificate must name 127.0.0.1.
  ``--enable-supernode-auth`` is refused together with ``--insecure``.
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
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medfed.runtime.flower.deploy_errors import FlowerDeploymentError
from medfed.types import StrEnum

__all__ = [
    "CONNECTION_NAME",
    "FLOWER_CONFIG_FILE",
    "LOOPBACK",
    "ConfigValue",
    "FlowerExecutable",
    "InsecureDeploymentWarning",
    "IsolationMode",
    "NodeStatus",
    "OutputFormat",
    "RunStatus",
    "SuperLinkConnection",
    "SuperLinkOptions",
    "SuperNodeOptions",
    "TlsFiles",
    "format_config",
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


class InsecureDeploymentWarning(UserWarning):
    """TLS (and therefore SuperNode authentication) was switched off on purpose."""


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
