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

    from medfed.cli_flower import add_parsers as add_flower_parsers

    add_flower_parsers(sub)  # flower certs|superlink|supernode|register|run

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
        "list": _cmd_list,
        "audit": _cmd_audit,
    }
    from medfed.cli_audit import HANDLERS as ledger_handlers

    handlers |= ledger_handlers
    from medfed.cli_he import HANDLERS as he_handlers

    handlers |= he_handlers
    from medfed.cli_flower import HANDLERS as flower_handlers

    handlers |= flower_handlers
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
