"""``medfed flower superlink | supernode | register | run``: Flower's deployment commands with the
flags a federation needs, secure by default, and errors a hospital IT team can act on.

Each command checks its files before starting anything, runs Flower's own executable, and turns
Flower's raw gRPC noise (endless retries, "generator didn't yield") into one message via
:func:`~medfed.runtime.flower.deploy.explain_flower_error`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from medfed.config import load_config
from medfed.runtime.flower.deploy import RunResult
from medfed.runtime.flower.deploy_args import (
    RunStatus,
    SuperLinkConnection,
    SuperLinkOptions,
    SuperNodeOptions,
    TlsFiles,
    list_runs_args,
    register_args,
    run_args,
    run_log_args,
)
from medfed.runtime.flower.deploy_errors import FlowerDeploymentError, explain_flower_error
from medfed.runtime.flower.deploy_processes import _run_cli, flower_env
from medfed.runtime.flower.server import write_app_dir

DEFAULT_HOME = Path.home() / ".medfed" / "flwr"  # medfed's own FLWR_HOME, never ~/.flwr


def tls_from_dir(certs: Path) -> TlsFiles:
    """The files ``medfed flower certs`` writes, by their names."""
    return TlsFiles(certs / "ca.crt", certs / "superlink.crt", certs / "superlink.key")


def _foreground(argv: Sequence[str], *, env: Mapping[str, str] | None, what: str) -> int:
    """Run a long-lived Flower process, echoing its output; explain it if it fails."""
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(
        list(argv),
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                tail.append(line.rstrip())
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=10)
            return 130
        code = proc.wait()
    if code != 0:
        raise FlowerDeploymentError(explain_flower_error("\n".join(tail), context=what))
    return 0


def superlink(
    certs: Path | None,
    *,
    host: str,
    port: int,
    database: Path | None,
    insecure: bool,
) -> int:
    options = SuperLinkOptions(
        tls=None if insecure or certs is None else tls_from_dir(certs),
        host=host,
        port=port,
        database=database,
        enable_supernode_auth=not insecure,
        insecure=insecure,
    )
    options.require_files()
    return _foreground(options.args(), env=None, what=f"the SuperLink on {options.address}")


def supernode(
    superlink_address: str,
    *,
    site: str,
    site_data: Path,
    ca: Path | None,
    key: Path | None,
    port: int,
    insecure: bool,
    he_context: Path | None = None,
    ledger_dir: Path | None = None,
) -> int:
    """A hospital's SuperNode: its data is named here and read only on this machine.

    ``ledger_dir`` keeps the site's ledger key and replicas on its disk, so the site signs with
    the same key in every run (a resumed run refuses a site whose key changed)."""
    if not site_data.is_file():
        raise FileNotFoundError(f"--site-data {site_data}: no such run/data config file")
    load_config(site_data)  # a typo in the site's data config fails here, not in round 1
    node_config = {"site": site, "data-config": str(site_data.resolve())}
    if he_context is not None:
        if not he_context.is_file():
            raise FileNotFoundError(f"--he-context {he_context}: no such file")
        node_config["he-context"] = str(he_context.resolve())
    if ledger_dir is not None:
        ledger_dir.mkdir(parents=True, exist_ok=True)
        node_config["ledger-dir"] = str(ledger_dir.resolve())
    options = SuperNodeOptions(
        superlink=superlink_address,
        root_certificates=None if insecure else ca,
        auth_private_key=key,
        node_config=node_config,
        port=port,
        insecure=insecure,
    )
    options.require_files()
    return _foreground(
        options.args(), env=None, what=f"SuperNode {site!r} connecting to {superlink_address}"
    )


def _connection(
    superlink_address: str, ca: Path | None, *, insecure: bool, home: Path
) -> dict[str, str]:
    SuperLinkConnection(
        address=superlink_address, root_certificates=None if insecure else ca, insecure=insecure
    ).write(home)
    return flower_env(home)


def register(
    public_key: Path, *, superlink_address: str, ca: Path | None, home: Path = DEFAULT_HOME
) -> str:
    """Register a SuperNode's public key with the SuperLink; returns its node id."""
    if not public_key.is_file():
        raise FileNotFoundError(f"public key {public_key} not found")
    env = _connection(superlink_address, ca, insecure=False, home=home)
    done = _run_cli(register_args(public_key), env, timeout=120)
    if done.returncode != 0:
        raise FlowerDeploymentError(
            explain_flower_error(done.output, context=f"registering {public_key.name}")
        )
    return str(done.json().get("node-id", ""))


def run(
    config: Path,
    *,
    superlink_address: str,
    ca: Path | None,
    sites: int,
    out: Path | None,
    timeout: float,
    insecure: bool = False,
    home: Path = DEFAULT_HOME,
    resume: bool = False,
) -> RunResult:
    """Start a medfed run on the federation and wait for its outcome (not just the CLI's);
    ``resume`` continues the run in ``out`` from its last checkpoint."""
    loaded = load_config(config)  # validate before anything is sent
    env = _connection(superlink_address, ca, insecure=insecure, home=home)
    app = write_app_dir(home / "apps" / "medfed")
    run_config: dict[str, str | int | float] = {
        "config": str(config.resolve()),
        "out": str((out or Path("runs") / f"{loaded.name}-flower").resolve()),
        "num-sites": sites,
        "timeout": timeout,
        "resume": resume,
    }
    return launch(app, run_config, env)


def launch(
    app: Path, run_config: Mapping[str, str | int | float | bool], env: dict[str, str]
) -> RunResult:
    """``flwr run`` the Flower App folder ``app`` and wait for the run's real outcome."""
    started = _run_cli(run_args(app, run_config=run_config, stream=True), env, 7 * 24 * 3600.0)
    if started.returncode != 0:
        raise FlowerDeploymentError(explain_flower_error(started.output, context="flwr run"))
    run_id = int(str(started.json()["run-id"]))
    # `flwr run --stream` exits 0 even when the ServerApp failed: ask for the run's status.
    while True:
        runs = _run_cli(list_runs_args(run_id), env, timeout=120).json().get("runs", [])
        if isinstance(runs, list) and runs:
            status = RunStatus(str(runs[0]["status"]))
            if status.finished:
                details = str(runs[0].get("status-details", ""))
                break
        time.sleep(1.0)
    log = "" if status is RunStatus.COMPLETED else _run_cli(run_log_args(run_id), env, 120).output
    return RunResult(run_id, status, details, log)
