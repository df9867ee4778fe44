"""SecAgg+ deployment: run-config options, the deployment ServerApp and ``flwr run``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfed.config import load_config
from medfed.engine import FederationError
from medfed.runtime.flower.codec import as_float, as_int
from medfed.runtime.flower.commands import DEFAULT_HOME, _connection, launch
from medfed.runtime.flower.deploy import RunResult as DeploymentResult
from medfed.runtime.flower.secagg.plan import SecAggOptions, check_secagg
from medfed.runtime.flower.secagg.server import serve_secagg

_RUN_CONFIG_OPTIONS = {
    "secagg-num-shares": "num_shares",
    "secagg-threshold": "reconstruction_threshold",
    "secagg-max-weight": "max_weight",
    "secagg-clipping-range": "clipping_range",
    "secagg-quantization-range": "quantization_range",
}


def options_from_run_config(run_config: Mapping[str, Any]) -> SecAggOptions:
    """SecAggOptions from a Flower run config (``secagg-*`` keys, ``timeout``; a
    ``secagg-max-weight`` of 0 means: derive it)."""
    values: dict[str, Any] = {
        field: run_config[key] for key, field in _RUN_CONFIG_OPTIONS.items() if key in run_config
    }
    if not values.get("max_weight"):
        values.pop("max_weight", None)
    if "timeout" in run_config:
        values["timeout"] = as_float(run_config["timeout"])
    return SecAggOptions.model_validate(values)


def options_to_run_config(options: SecAggOptions) -> dict[str, str | int | float | bool]:
    """The ``secagg-*`` run-config keys (Flower accepts only keys the App declares: all are)."""
    dumped = options.model_dump()
    dumped["max_weight"] = dumped["max_weight"] or 0.0
    return {key: dumped[field] for key, field in _RUN_CONFIG_OPTIONS.items()}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: run config ``config``, ``out``, ``num-sites``, ``timeout`` and
    the ``secagg-*`` options (see ``options_from_run_config``)."""
    rc = context.run_config
    if not rc.get("config"):
        raise FederationError("run config 'config' (path of the medfed YAML) is not set")
    config = load_config(str(rc["config"]))
    serve_secagg(
        grid,
        context,
        config,
        out_dir=Path(str(rc.get("out") or f"runs/{config.name}-flower-secagg")),
        num_sites=as_int(rc.get("num-sites", config.federation.min_clients)),
        options=options_from_run_config(rc),
    )


COMPONENTS = {
    "serverapp": "medfed.runtime.flower.secagg:app",
    "clientapp": "medfed.runtime.flower.secagg:secagg_client_app",
}


def write_secagg_app_dir(dst: Path) -> Path:
    """A Flower App folder whose components are this module's apps (SecAgg+ at every site),
    declaring the ``secagg-*`` run-config keys (``flwr run`` refuses undeclared ones)."""
    from medfed.runtime.flower.server import APP_TEMPLATE

    defaults = options_to_run_config(SecAggOptions())
    lines = []
    for line in APP_TEMPLATE.read_text().splitlines():
        name = line.partition("=")[0].strip()
        if name in COMPONENTS:
            line = f'{name} = "{COMPONENTS[name]}"'
        lines.append(line)
        if line.strip() == "[tool.flwr.app.config]":
            lines.append("# SecAgg+ options (medfed.runtime.flower.secagg.SecAggOptions);")
            lines.append("# secagg-max-weight 0: derive it from the sites' training-set sizes.")
            lines += [f"{key} = {json.dumps(value)}" for key, value in defaults.items()]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return dst


def run_deployment(
    config: Path,
    *,
    superlink_address: str,
    ca: Path | None,
    sites: int,
    out: Path | None,
    timeout: float,
    options: SecAggOptions | None = None,
    insecure: bool = False,
    home: Path | None = None,
) -> DeploymentResult:
    """``medfed flower run --secagg``: as ``commands.run``, with the SecAgg+ components and
    options; the federation is checked before anything is sent."""
    home = home or DEFAULT_HOME
    loaded = load_config(config)
    options = (options or SecAggOptions()).model_copy(update={"timeout": timeout})
    check_secagg(loaded, sites, options)
    env = _connection(superlink_address, ca, insecure=insecure, home=home)
    app_dir = write_secagg_app_dir(home / "apps" / "medfed-secagg")
    run_config: dict[str, str | int | float | bool] = {
        "config": str(config.resolve()),
        "out": str((out or Path("runs") / f"{loaded.name}-flower-secagg").resolve()),
        "num-sites": sites,
        "timeout": timeout,
        **options_to_run_config(options),
    }
    return launch(app_dir, run_config, env)
