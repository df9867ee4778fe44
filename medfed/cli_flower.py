"""``medfed flower certs|superlink|supernode|register|run``: real sites over Flower deployment.

Registered by :mod:`medfed.cli`; kept here so the main command line stays small.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)


def add_parsers(sub: Any) -> None:
    flower = sub.add_parser("flower", help="run across real sites on Flower's deployment runtime")
    fsub = flower.add_subparsers(dest="flower_command", required=True)
    certs = fsub.add_parser(
        "certs", help="development TLS certificates and SuperNode keys (not for production)"
    )
    certs.add_argument("out", metavar="OUT_DIR")
    certs.add_argument(
        "--host",
        dest="hosts",
        action="append",
        help="SuperLink host name or IP for the certificate (repeatable; default localhost, "
        "127.0.0.1)",
    )
    certs.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to create")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")

    def _insecure(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--insecure",
            action="store_true",
            help="NO TLS and no node authentication: only for a throw-away test on one machine",
        )

    link = fsub.add_parser("superlink", help="start the SuperLink (TLS + SuperNode auth)")
    link.add_argument("--certs", type=Path, help="folder written by `medfed flower certs`")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on")
    link.add_argument("--port", type=int, default=9093)
    link.add_argument("--database", type=Path, help="state file (default: in memory)")
    _insecure(link)
    node = fsub.add_parser("supernode", help="start a hospital's SuperNode on its own data")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--site", required=True, help="this site's name in the data config")
    node.add_argument(
        "--site-data", required=True, type=Path, help="run config YAML whose data section is local"
    )
    node.add_argument("--key", type=Path, help="this SuperNode's OpenSSH private key")
    node.add_argument("--ca", type=Path, help="the federation's CA certificate")
    node.add_argument("--port", type=int, default=9094, help="local ClientApp API port")
    node.add_argument(
        "--he-context",
        type=Path,
        help="the federation's shared CKKS secret context (`medfed he keys`), for privacy.he runs",
    )
    node.add_argument(
        "--ledger-dir",
        type=Path,
        help="folder for this site's ledger key and replicas (default $MEDFED_LEDGER_DIR, else "
        "memory: a new key per run, which a resumed run refuses)",
    )
    _insecure(node)
    reg = fsub.add_parser("register", help="allow a SuperNode's public key to join")
    reg.add_argument("public_key", type=Path, metavar="PUBKEY")
    reg.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    reg.add_argument("--ca", type=Path, required=True, help="the federation's CA certificate")
    frun = fsub.add_parser("run", help="run a medfed config on the federation")
    frun.add_argument("config", type=Path, help="run config YAML (federation, model, training)")
    frun.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    frun.add_argument("--ca", type=Path, help="the federation's CA certificate")
    frun.add_argument("--sites", type=int, required=True, help="SuperNodes to wait for")
    frun.add_argument("--out", type=Path, help="run directory on the SuperLink's machine")
    frun.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per exchange")
    frun.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (same config; not with --secagg)",
    )
    frun.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation (Flower's SecAgg+): the server sees only the sites' weighted "
        "mean; fedavg/fedprox, >= 3 sites (medfed.runtime.flower.secagg)",
    )
    frun.add_argument(
        "--secagg-shares", type=int, default=3, help="SecAgg+ num_shares (odd, > 2, <= sites)"
    )
    frun.add_argument(
        "--secagg-threshold",
        type=int,
        default=2,
        help="SecAgg+ reconstruction threshold (< shares; tolerates shares - threshold dropouts)",
    )
    _insecure(frun)


def cmd_flower(args: argparse.Namespace) -> int:
    from medfed.runtime.flower import commands

    cmd = args.flower_command
    if getattr(args, "insecure", False):
        console.print(
            "[bold red]WARNING: --insecure: no TLS, no node authentication. Anyone on the "
            "network can read model updates and join the federation. Never use it with real "
            "patient data.[/]"
        )
    elif cmd in ("superlink",) and args.certs is None:
        raise ValueError("give --certs DIR (from `medfed flower certs`), or --insecure")
    elif cmd in ("supernode", "run") and args.ca is None:
        raise ValueError("give --ca (the federation's CA certificate), or --insecure")
    if cmd == "superlink":
        return commands.superlink(
            args.certs, host=args.host, port=args.port, database=args.database,
            insecure=args.insecure,
        )  # fmt: skip
    if cmd == "supernode":
        if not args.insecure and args.key is None:
            raise ValueError("give --key (this SuperNode's private key from `medfed flower certs`)")
        return commands.supernode(
            args.superlink, site=args.site, site_data=args.site_data, ca=args.ca, key=args.key,
            port=args.port, insecure=args.insecure, he_context=args.he_context,
            ledger_dir=args.ledger_dir,
        )  # fmt: skip
    if cmd == "register":
        node_id = commands.register(args.public_key, superlink_address=args.superlink, ca=args.ca)
        console.print(f"[green]registered[/] {args.public_key} as node {node_id}")
        return 0
    if cmd == "run" and args.secagg:
        from medfed.runtime.flower.secagg import SecAggOptions, run_deployment

        if args.resume:
            raise ValueError(
                "--resume with --secagg: a SecAgg+ run cannot be resumed yet; start it anew"
            )
        options = SecAggOptions(
            num_shares=args.secagg_shares, reconstruction_threshold=args.secagg_threshold
        )
        result = run_deployment(
            args.config, superlink_address=args.superlink, ca=args.ca, sites=args.sites,
            out=args.out, timeout=args.timeout, options=options, insecure=args.insecure,
        )  # fmt: skip
    elif cmd == "run":
        result = commands.run(
            args.config, superlink_address=args.superlink, ca=args.ca, sites=args.sites,
            out=args.out, timeout=args.timeout, insecure=args.insecure, resume=args.resume,
        )  # fmt: skip
    if cmd == "run":
        if not result.ok:
            console.print(Text.assemble(("run failed: ", "bold red"), result.details))
            print(result.log[-4000:])
            return 1
        console.print(f"[green]run {result.run_id} completed[/]")
        return 0
    from medfed.runtime.flower.certs import generate_dev_certificates

    made = generate_dev_certificates(
        Path(args.out),
        hosts=tuple(args.hosts or ("localhost", "127.0.0.1")),
        num_nodes=args.nodes,
        days=args.days,
        overwrite=args.overwrite,
    )
    console.print(
        f"[green]wrote[/] CA {made.ca_cert}, SuperLink certificate {made.server_cert} and "
        f"{len(made.node_keys)} SuperNode key pair(s) (OpenSSH) to {args.out}; "
        "development use only"
    )
    return 0


HANDLERS = {"flower": cmd_flower}
