"""``medfed`` command line: run, study, data synth, data preview, list.

Errors a user can fix (config typos, missing files, a federation that lost too many sites) are
printed as one message without a traceback; set MEDFED_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from medfed.config import DataConfig

console = Console(stderr=True, soft_wrap=True)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set federation.rounds=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfed", description="Federated learning for medical images."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train one federated (or centralized/local) run")
    run.add_argument("config", nargs="?", help="YAML preset, e.g. configs/quickstart.yaml")
    _add_set(run)
    run.add_argument("--out", help="run directory (default runs/<name>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress display")

    study = sub.add_parser(
        "study",
        help="centralized vs federated vs local-only for each network, with statistics and a report",
    )
    study.add_argument("config", help="YAML study preset, e.g. configs/study-quickstart.yaml")
    _add_set(study)
    study.add_argument(
        "--out", help="study directory (default runs/<name>); rerun the same command to resume"
    )
    study.add_argument("--quiet", action="store_true", help="no progress display")

    data = sub.add_parser("data", help="built-in data: synthesize, preview")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="generate a synthetic federation to a folder")
    synth.add_argument("kind", choices=["ultrasound", "histology"])
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument(
        "--format",
        choices=["folder", "medmnist"],
        default="folder",
        help="folder: per-site cache + manifest + preview; medmnist: one OUT/<kind>mnist.npz in "
        "MedMNIST's layout (train/val = training sites pooled, test = the external site)",
    )
    synth.add_argument("--size", type=int, default=28, help="medmnist: image side in pixels")
    _add_set(synth)
    prev = dsub.add_parser("preview", help="PNG grid of example images per site, masks outlined")
    prev.add_argument(
        "config", nargs="?", help="run or study config whose data to preview (optional)"
    )
    prev.add_argument(
        "--kind",
        choices=["ultrasound", "histology"],
        default="ultrasound",
        help="built-in federation to preview when no config is given",
    )
    prev.add_argument("--out", required=True, help="PNG file to write")
    prev.add_argument("--per-site", type=int, default=8)
    _add_set(prev)

    check = dsub.add_parser(
        "check",
        help="validate a site's dataset before training (unreadable files, labels, duplicates, "
        "patient leakage, files missing from disk or manifest)",
    )
    check.add_argument("source", help="manifest .csv, MedMNIST .npz, or a folder of DICOM files")
    check.add_argument(
        "--kind", choices=["image_csv", "dicom", "nifti", "medmnist"], help="override the guess"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    deid = dsub.add_parser(
        "deid",
        help="de-identify DICOM files (PS3.15 Basic Profile) from IN into a new folder OUT",
    )
    deid.add_argument("input", metavar="IN", help="DICOM file or folder (read only)")
    deid.add_argument("output", metavar="OUT", help="new folder; never IN or inside it")
    secret = deid.add_mutually_exclusive_group()
    secret.add_argument(
        "--site-secret",
        help="the site's pseudonymisation secret (prefer --site-secret-file or "
        "$MEDFED_SITE_SECRET: command lines are visible to other users)",
    )
    secret.add_argument("--site-secret-file", help="file holding the site secret")
    deid.add_argument(
        "--shift-dates",
        action="store_true",
        help="shift dates by a per-patient offset instead of removing them",
    )
    deid.add_argument(
        "--rename",
        action="store_true",
        help="write <pseudonym>.dcm files in one flat folder (file and folder names often carry "
        "patient names); the audit maps them back",
    )
    deid.add_argument(
        "--mask-banner",
        metavar="RECT",
        help="black out burned-in text: 'ROWS' (top rows) or 'top,left,height,width' in pixels",
    )

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

    from medfed.privacy.audit import add_audit_parser

    add_audit_parser(sub)
    from medfed.cli_audit import add_parsers as add_ledger_parsers

    add_ledger_parsers(sub)  # keys new, ledger verify|show
    from medfed.cli_he import add_parsers as add_he_parsers

    add_he_parsers(sub)  # he keys

    lst = sub.add_parser("list", help="registered components")
    lst.add_argument("what", choices=["strategies", "models"])
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from medfed.config import load_config
    from medfed.engine import run

    if args.resume:
        if args.config or args.overrides:
            raise ValueError("--resume takes the run's own config; do not pass CONFIG or --set")
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        config = load_config(cfg_path)
        result = run(config, out_dir=run_dir, resume=True, progress=not args.quiet)
    else:
        if not args.config:
            raise ValueError("give a CONFIG file, or --resume RUN_DIR")
        config = load_config(args.config, args.overrides)
        run_dir = Path(args.out or Path("runs") / config.name)
        result = run(config, out_dir=run_dir, progress=not args.quiet)
    s = result.summary
    print(json.dumps({k: s[k] for k in s if k not in {"site_val", "sites"}}, indent=2))
    console.print(f"[green]done[/] -> {run_dir}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from medfed.study import load_study_config, run_study

    config = load_study_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / config.name)
    result = run_study(config, out_dir=out, progress=not args.quiet)
    metric, label = ("dice", "Dice") if config.task == "segmentation" else ("auc", "AUC")
    for network in result.results["meta"]["networks"]:
        for paradigm, splits in result.results[network].items():
            if paradigm.startswith("local:"):
                continue
            line = "  ".join(
                f"{split} {label} {m[metric]:.3f}"
                for split, m in splits.items()
                if split in {"internal", "external"} and m.get(metric) is not None
            )
            print(f"{network:>14} {paradigm:<12} {line}")
    console.print(f"[green]done[/] -> {out} (report: {result.report_html})")
    return 0


_SOURCES = {"ultrasound": "synthetic_ultrasound", "histology": "synthetic_histology"}


def _data_config(config_path: str | None, overrides: Sequence[str], *, kind: str) -> DataConfig:
    """The ``data`` section of a run or study config, or of the built-in ``kind``.

    With a config, ``--set`` keys are relative to the config (``data.histology.image_size=128``);
    without one they are options of the built-in generator (``image_size=128``).
    """
    from medfed.config import ConfigError, DataConfig, read_yaml, validate_tree

    if config_path:
        raw = read_yaml(config_path)
        sets = [o.removeprefix("data.") for o in overrides if o.startswith("data.")]
        others = [o for o in overrides if not o.startswith("data.")]
        if others:
            raise ConfigError(f"data preview: only data.* can be --set, got {others}")
        return validate_tree(DataConfig, raw.get("data"), sets, source=f"{config_path} (data)")
    return validate_tree(
        DataConfig,
        {"source": _SOURCES[kind]},
        [f"{kind}.{o}" for o in overrides],
        source=f"built-in {kind} data",
    )


def _site_secret(args: argparse.Namespace) -> bytes:
    if args.site_secret_file:
        return Path(args.site_secret_file).read_bytes().strip()
    if args.site_secret:
        return args.site_secret.encode()
    env = os.environ.get("MEDFED_SITE_SECRET", "")
    if not env:
        raise ValueError(
            "a site secret is required: --site-secret-file PATH, $MEDFED_SITE_SECRET or "
            "--site-secret (the same secret gives the same pseudonyms, so keep it safe)"
        )
    return env.encode()


def _cmd_deid(args: argparse.Namespace) -> int:
    from medfed.data.deid import DeidOptions, deidentify_tree, parse_mask_rect

    options = DeidOptions(
        site_secret=_site_secret(args),
        shift_dates=args.shift_dates,
        mask_rect=parse_mask_rect(args.mask_banner) if args.mask_banner else None,
        rename_files=args.rename,
    )
    report = deidentify_tree(Path(args.input), Path(args.output), options=options)
    console.print(
        f"[green]de-identified[/] {report.processed} file(s) -> {args.output}; "
        f"skipped {len(report.skipped)} non-DICOM, failed {len(report.failed)}, "
        f"possible burned-in text in {len(report.burned_in)}; audit: {report.audit_path}"
    )
    for path, why in report.failed:
        console.print(Text.assemble(("failed: ", "bold red"), f"{path}: {why}"))
    if report.burned_in and options.mask_rect is None:
        console.print(
            "[yellow]images that may carry burned-in patient text are listed in the audit; "
            "mask them with --mask-banner or review them before they leave the site"
        )
    return 1 if report.failed else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from medfed.data.check import check_source, render, to_json

    report = check_source(Path(args.source), kind=args.kind)
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        render(report, Console(soft_wrap=True))
    return 0 if report.ok else 1


def _cmd_data(args: argparse.Namespace) -> int:
    from medfed.data.synthetic.preview import write_preview
    from medfed.engine import load_federation

    if args.data_command == "deid":
        return _cmd_deid(args)
    if args.data_command == "check":
        return _cmd_check(args)
    if args.data_command == "synth" and args.format == "medmnist":
        return _synth_medmnist(args)
    if args.data_command == "synth":
        data = _data_config(None, args.overrides, kind=args.kind)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fed, _ = load_federation(data.model_copy(update={"cache_dir": str(out)}))
        sites = list(fed.sites) + ([fed.external] if fed.external is not None else [])
        options = data.ultrasound if args.kind == "ultrasound" else data.histology
        manifest = {
            "kind": args.kind,
            "options": options.model_dump(mode="json"),
            "sites": {
                s.name: {
                    "train": len(s.train),
                    "val": len(s.val),
                    "train_class_counts": s.train.class_counts(),
                    "val_class_counts": s.val.class_counts(),
                    "external": s is fed.external,
                }
                for s in sites
            },
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        write_preview(fed, out / "preview.png", class_names=_class_names(args.kind))
        console.print(
            f"[green]wrote[/] {out} ({sum(len(s.train) + len(s.val) for s in fed.sites)} training-site images)"
        )
        return 0
    data = _data_config(args.config, args.overrides, kind=args.kind)
    fed, _ = load_federation(data)
    kind = "histology" if data.source == "synthetic_histology" else "ultrasound"
    path = write_preview(
        fed, Path(args.out), per_site=args.per_site, class_names=_class_names(kind)
    )
    console.print(f"[green]wrote[/] {path}")
    return 0


def _synth_medmnist(args: argparse.Namespace) -> int:
    from medfed.data.synthetic.medmnist_export import medmnist_arrays, write_medmnist
    from medfed.engine import load_federation

    fed, _ = load_federation(_data_config(None, args.overrides, kind=args.kind))
    arrays = medmnist_arrays(fed, size=args.size)
    path = write_medmnist(Path(args.out) / f"{args.kind}mnist.npz", arrays)
    counts = ", ".join(f"{s} {len(arrays[f'{s}_labels'])}" for s in ("train", "val", "test"))
    console.print(f"[green]wrote[/] {path} ({counts}; {args.size}x{args.size})")
    return 0


def _class_names(kind: str) -> tuple[str, str]:
    return ("N", "T") if kind == "histology" else ("B", "M")


def _cmd_flower(args: argparse.Namespace) -> int:
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


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "strategies":
        from medfed.algorithms import STRATEGIES

        for name in STRATEGIES.names():
            opts = STRATEGIES.options(name)
            fields = (
                ", ".join(f"{k}={f.default!r}" for k, f in opts.model_fields.items())
                if opts is not None
                else ""
            )
            print(f"{name}" + (f"  (options: {fields})" if fields else ""))
    else:
        from medfed.models.factory import model_names, model_task

        print("\n".join(f"{name}  ({model_task(name)})" for name in model_names()))
        print("timm:<any timm model name>")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from medfed.privacy.audit import cmd_audit

    return cmd_audit(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from medfed.config import ConfigError
    from medfed.engine import FederationError
    from medfed.runtime.flower.deploy import FlowerDeploymentError
    from medfed.study import StudyError

    handlers = {
        "run": _cmd_run,
        "study": _cmd_study,
        "data": _cmd_data,
        "flower": _cmd_flower,
        "list": _cmd_list,
        "audit": _cmd_audit,
    }
    from medfed.cli_audit import HANDLERS as ledger_handlers

    handlers |= ledger_handlers
    from medfed.cli_he import HANDLERS as he_handlers

    handlers |= he_handlers
    try:
        return handlers[args.command](args)
    except ConfigError as err:
        console.print(Text.assemble(("config error: ", "bold red"), str(err)))
        return 2
    except (
        FederationError,
        StudyError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
        FlowerDeploymentError,
    ) as err:
        if os.environ.get("MEDFED_DEBUG"):
            raise
        console.print(Text.assemble(("error: ", "bold red"), str(err)))
        return 1


if __name__ == "__main__":
    sys.exit(main())
