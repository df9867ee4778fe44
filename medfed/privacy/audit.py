"""``medfed audit attack (RUN_DIR | CONFIG)``: can the server read a site's images in its update?

The audit takes one site's update on a batch from its training split, attacks it by gradient
inversion (:mod:`medfed.privacy.attack`) as sent and after the site's local DP step (clip to C,
add N(0, (sigma C)^2)), and writes

* ``audit.json``: the options, the site and batch, true and inferred labels, per-image SSIM and
  PSNR (after optimal matching) and their means for both attacks, the DP setting, the seconds;
* ``audit.html``: one self-contained page (images as base64 PNG data URIs): originals, the
  reconstruction from the plain update and the one from the DP update, with their scores.

With a RUN_DIR the attacked model is the run's latest global model (latest checkpoint, else
``final.safetensors``): what the server holds when the next round's updates arrive. With a CONFIG
it is the freshly initialised model of that config (round 0). A DP config (``privacy.dp``) builds
the DP model (BatchNorm replaced by GroupNorm), exactly as training would.

The images are scored as :func:`medfed.privacy.attack.score_space` describes (with ``per_image``
normalisation the update cannot reveal an image's brightness and contrast, so both sides are
compared after z-scoring); the HTML shows the images in that same space.

Wiring into ``medfed.cli`` (two lines)::

    from medfed.privacy.audit import add_audit_parser, cmd_audit

    add_audit_parser(sub)                  # in build_parser(), ``sub`` = parser.add_subparsers(...)
    handlers["audit"] = cmd_audit          # in main(): args.command == "audit" -> cmd_audit(args)

``run_audit`` raises ``FileNotFoundError`` / ``ValueError`` (``ConfigError`` for bad configs)
with messages naming the path, which ``medfed.cli.main`` prints without a traceback.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from medfed.privacy.attack import (
    AttackOptions,
    AttackResult,
    UpdateKind,
    attack,
    client_update,
    privatize,
    score_space,
)
from medfed.privacy.image_metrics import ImageScore, score

if TYPE_CHECKING:
    from medfed.data.site import Federation, Site

__all__ = [
    "AttackSide",
    "AuditResult",
    "add_audit_parser",
    "cmd_audit",
    "resolve_target",
    "run_audit",
]

_PREVIEW_PX = 128  # each image is drawn at least this large (nearest neighbour) in the HTML


@dataclass(frozen=True)
class AttackSide:
    """One attack of the audit: on the update as sent (``no_dp``) or after the DP step (``dp``)."""

    name: str
    result: AttackResult
    scores: list[ImageScore]
    images: torch.Tensor  # the reconstruction in score space, (B, C, H, W) in [0, 1]

    @property
    def mean_ssim(self) -> float:
        return float(np.mean([s.ssim for s in self.scores]))

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([s.psnr for s in self.scores]))


@dataclass(frozen=True)
class AuditResult:
    json_path: Path
    html_path: Path
    report: dict[str, Any]
    originals: torch.Tensor  # score space, (B, C, H, W) in [0, 1]
    no_dp: AttackSide
    dp: AttackSide


def resolve_target(target: Path) -> tuple[Path, Path | None]:
    """(config file, run directory or None) of an audit target; clear errors naming the path."""
    if not target.exists():
        raise FileNotFoundError(
            f"audit target {target} does not exist: give a run directory (holding config.yaml) "
            "or a YAML run config"
        )
    if target.is_dir():
        config = target / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(
                f"{target} is not a run directory (no config.yaml in it) and not a YAML config"
            )
        return config, target
    if target.suffix.lower() not in {".yaml", ".yml"}:
        raise ValueError(
            f"{target} is neither a run directory nor a YAML config (.yaml / .yml): cannot audit it"
        )
    return target, None


def _load_run_params(model: nn.Module, run_dir: Path) -> int | None:
    """Load the run's latest global model into ``model``; return its round (None: final only)."""
    from medfed.checkpoint import load_latest, load_params

    ckpt = load_latest(run_dir)
    if ckpt is not None:
        params, round_idx = ckpt.global_params, ckpt.round_idx
    elif (run_dir / "final.safetensors").is_file():
        params, round_idx = load_params(run_dir / "final.safetensors"), None
    else:
        raise FileNotFoundError(
            f"{run_dir} holds no model to attack: no checkpoints/round_* and no final.safetensors"
        )
    try:
        model.load_state_dict(params)
    except RuntimeError as err:
        raise ValueError(
            f"the model saved in {run_dir} does not fit the model its config.yaml builds: {err}"
        ) from None
    return round_idx


def _pick_site(federation: Federation, site: str | None) -> Site:
    names = [s.name for s in federation.sites]
    if site is None:
        return federation.sites[0]
    for s in federation.sites:
        if s.name == site:
            return s
    raise ValueError(f"no training site {site!r} in this federation; sites: {', '.join(names)}")


def _png_uri(image: torch.Tensor) -> str:
    """(C, H, W) in [0, 1] -> a PNG data URI (grayscale for 1 channel), upscaled for viewing."""
    arr = (image.detach().double().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    pil = (
        Image.fromarray(arr[0])
        if arr.shape[0] == 1
        else Image.fromarray(arr[:3].transpose(1, 2, 0))
    )
    scale = max(1, math.ceil(_PREVIEW_PX / max(pil.size)))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt_psnr(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.1f} dB"


def _side_json(side: AttackSide, true_labels: list[int]) -> dict[str, Any]:
    psnr = side.mean_psnr
    return {
        "inferred_labels": side.result.labels,
        "labels_correct": sorted(side.result.labels) == sorted(true_labels),
        "images": [s.to_json() for s in side.scores],
        "mean_ssim": side.mean_ssim,
        "mean_psnr": psnr if math.isfinite(psnr) else None,
        "gradient_match_loss": side.result.loss,
        "seconds": side.result.seconds,
    }


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { text-align: left; padding: .25em .8em; vertical-align: top; }
th { color: #555; font-weight: 600; }
figure { margin: 0; text-align: center; font-size: .85em; }
img { image-rendering: pixelated; width: 128px; border: 1px solid #ccc; }
"""


def _write_html(
    path: Path, report: dict[str, Any], originals: torch.Tensor, sides: Sequence[AttackSide]
) -> None:
    """The page: facts, what the scores mean, and a grid (rows: original / no DP / DP)."""
    dp = report["dp"]
    a, b = report["attacks"]["no_dp"], report["attacks"]["dp"]
    titles = {
        "no_dp": "reconstruction from the update as sent",
        "dp": f"reconstruction from the DP update (C={dp['clip']:g}, σ={dp['noise_multiplier']:g})",
    }
    rows = [("original", originals, [f"label {y}" for y in report["true_labels"]])]
    for side in sides:  # each original's matched reconstruction sits under it
        recon = torch.stack([side.images[s.recon_index] for s in side.scores])
        caps = [f"SSIM {s.ssim:.3f} · PSNR {_fmt_psnr(s.psnr)}" for s in side.scores]
        rows.append((titles[side.name], recon, caps))
    grid = "".join(
        f"<tr><th>{html.escape(title)}</th>"
        + "".join(
            f'<td><figure><img src="{_png_uri(img)}" alt="{html.escape(title)} {i}">'
            f"<figcaption>{html.escape(cap)}</figcaption></figure></td>"
            for i, (img, cap) in enumerate(zip(images, caps, strict=True))
        )
        + "</tr>"
        for title, images, caps in rows
    )
    facts = {
        "target": f"{report['target']} ({report['model']}, {report['model_state']})",
        "site / batch": f"{report['site']}: {report['batch_size']} image(s) {report['indices']}",
        "update": f"{report['update']}, inputs normalised {report['normalize']}",
        "labels": f"true {report['true_labels']}; inferred {a['inferred_labels']} without DP, "
        f"{b['inferred_labels']} with DP",
        "budget": f"{report['iterations']} iterations × {report['restarts']} restart(s), "
        f"{report['seconds']:.1f} s on {report['device']}",
    }
    fact_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts.items()
    )
    meaning = (
        "An honest-but-curious server that knows the global model tried to recover this batch "
        "from the site's update alone: labels from the classifier's gradient (iDLG), then images "
        "whose gradient points the same way as the update, under a total-variation prior "
        "(Inverting Gradients). SSIM is 1 for a perfect copy and about 0 for an unrelated image; "
        "PSNR grows as the pixel error shrinks. "
        f"Without DP the attack scored a mean SSIM of {a['mean_ssim']:.3f}; after the site's DP "
        f"step (clip to {dp['clip']:g}, Gaussian noise of std {dp['noise_std']:g} per coordinate) "
        f"it scored {b['mean_ssim']:.3f}. A low score without DP means that this attack failed at "
        "this budget, not that the update is safe: stronger attacks exist. DP's guarantee does not "
        "depend on the attack; it bounds what any attack can learn."
    )
    if report["normalize"] == "per_image":
        meaning += (
            " Images are shown and scored z-scored: the network normalises each image, so no "
            "update reveals its brightness or contrast."
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>medfed gradient-inversion audit</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>Gradient-inversion audit</h1>\n<table>{fact_rows}</table>\n"
        f"<h2>What this means</h2>\n<p>{html.escape(meaning)}</p>\n"
        f"<h2>Originals and reconstructions</h2>\n<table>{grid}</table>\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")


def run_audit(
    target: Path,
    *,
    out_dir: Path,
    options: AttackOptions,
    overrides: Sequence[str] = (),
    site: str | None = None,
    progress: bool = True,
) -> AuditResult:
    """Attack one site's update with and without DP; write ``audit.json`` and ``audit.html``."""
    from medfed.build import build_federation, build_model
    from medfed.client.train import resolve_device
    from medfed.config import load_config
    from medfed.seeding import numpy_rng, torch_generator
    from medfed.types import Task

    target = Path(target)
    config_path, run_dir = resolve_target(target)
    config = load_config(config_path, overrides)
    if config.task is not Task.CLASSIFICATION:
        raise ValueError(
            f"the gradient-inversion audit supports classification runs; {target} is a "
            f"{config.task} run (iDLG reads image labels from the classifier's gradient)"
        )
    federation = build_federation(config)
    chosen = _pick_site(federation, site)
    data = chosen.train
    if data.images.ndim != 4:
        raise ValueError("the gradient-inversion audit supports 2-D images, not volumes")
    if len(data) < options.batch_size:
        raise ValueError(
            f"site {chosen.name!r} has {len(data)} training image(s), fewer than the batch of "
            f"{options.batch_size}"
        )
    model = build_model(config, federation)
    round_idx = _load_run_params(model, run_dir) if run_dir is not None else None
    device = resolve_device(options.device)
    model = model.to(device)

    rng = numpy_rng(options.seed, "audit", chosen.name)
    indices = sorted(rng.choice(len(data), size=options.batch_size, replace=False).tolist())
    images, labels = data.images[indices], data.labels[indices]
    shape = tuple(images.shape)
    lr = options.update_lr if options.update_lr is not None else config.train.lr
    normalize = config.train.normalize
    update = client_update(
        model, images, labels, kind=options.update, lr=lr, normalize=normalize, device=device
    )
    private, norm = privatize(
        update,
        clip=options.dp_clip,
        noise_multiplier=options.dp_noise_multiplier,
        generator=torch_generator(options.seed, "audit", "dp-noise"),
    )

    sides: list[AttackSide] = []
    start = time.perf_counter()
    with _progress_bar(progress, total=2 * options.restarts * options.iterations) as advance:
        for name, upd in (("no_dp", update), ("dp", private)):
            advance.describe(f"attack ({name.replace('_', ' ')})")
            result = attack(
                model, upd, shape=shape, options=options, lr=lr, normalize=normalize,
                device=device, on_step=advance,
                # The same initialisations for both: the DP step is the only difference.
                generator=torch_generator(options.seed, "audit", "init"),
            )  # fmt: skip
            original, recon = score_space(images, result.images, normalize)
            sides.append(AttackSide(name, result, score(original, recon), recon.float()))
    seconds = time.perf_counter() - start
    originals = score_space(images, images.float() / 255.0, normalize)[0].float()

    true_labels = [int(v) for v in labels.tolist()]
    report: dict[str, Any] = {
        "target": str(target),
        "target_kind": "run_dir" if run_dir is not None else "config",
        "model": config.model.name,
        "model_state": _model_state(run_dir, round_idx),
        "round": round_idx,
        "site": chosen.name,
        "batch_size": options.batch_size,
        "indices": indices,
        "image_shape": list(shape[1:]),
        "normalize": normalize,
        "update": str(options.update),
        "update_lr": lr,
        "update_norm": norm,
        "true_labels": true_labels,
        "dp": {
            "clip": options.dp_clip,
            "noise_multiplier": options.dp_noise_multiplier,
            "noise_std": options.dp_clip * options.dp_noise_multiplier,
            "clipped": norm > options.dp_clip,
        },
        "attacks": {side.name: _side_json(side, true_labels) for side in sides},
        "iterations": options.iterations,
        "restarts": options.restarts,
        "seconds": seconds,
        "device": str(device),
        "options": options.model_dump(mode="json"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "audit.json", out_dir / "audit.html"
    json_path.write_text(json.dumps(report, indent=2))
    _write_html(html_path, report, originals, sides)
    return AuditResult(json_path, html_path, report, originals, sides[0], sides[1])


def _model_state(run_dir: Path | None, round_idx: int | None) -> str:
    if run_dir is None:
        return "initial model (round 0)"
    return "final global model" if round_idx is None else f"global model after round {round_idx}"


class _Advance:
    """``on_step`` for :func:`attack`: moves a rich progress bar (or nothing)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self._progress = progress
        self._task = progress.add_task("attack", total=total) if progress is not None else None

    def __call__(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def _progress_bar(enabled: bool, *, total: int) -> Iterator[_Advance]:
    if not enabled:
        yield _Advance(None, total)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with progress:
        yield _Advance(progress, total)


# --------------------------------------------------------------------------------------------
# Command line


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``audit attack`` on ``subparsers`` (from ``parser.add_subparsers``)."""
    audit = subparsers.add_parser("audit", help="privacy audits of a run's updates")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = asub.add_parser(
        "attack",
        help="gradient inversion of one site's update, without and with DP (audit.json, .html)",
    )
    p.add_argument("target", metavar="TARGET", help="run directory (attacks its latest global "
                   "model) or YAML run config (attacks the initial model)")  # fmt: skip
    p.add_argument("--out", help="output folder (default: RUN_DIR/audit, or runs/audit-<name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.cache_dir=/tmp/c (repeatable)")  # fmt: skip
    p.add_argument("--site", help="site whose update is attacked (default: the first)")
    p.add_argument("--batch-size", type=int, help="images in the update, 1..8 (default 1)")
    p.add_argument("--iterations", type=int, help="optimiser steps per restart")
    p.add_argument("--restarts", type=int, help="random restarts")
    p.add_argument("--update", choices=[k.value for k in UpdateKind], help="gradient or delta")
    p.add_argument("--dp-clip", type=float, help="DP clipping norm C (default 1.0)")
    p.add_argument("--dp-noise", type=float, help="DP noise multiplier sigma (default 1.0)")
    p.add_argument("--seed", type=int, help="batch choice, DP noise and initialisations")
    p.add_argument("--device", help="auto, cpu or cuda[:N]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return audit


_OPTION_ARGS = {  # argparse dest -> AttackOptions field
    **{
        k: k
        for k in ("batch_size", "iterations", "restarts", "update", "dp_clip", "seed", "device")
    },
    "dp_noise": "dp_noise_multiplier",
}


def options_from_args(args: argparse.Namespace) -> AttackOptions:
    given = {
        field: getattr(args, arg)
        for arg, field in _OPTION_ARGS.items()
        if getattr(args, arg, None) is not None
    }
    try:
        return AttackOptions(**given)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"invalid audit options: {problems}") from None


def _default_out(target: Path) -> Path:
    if target.is_dir():
        return target / "audit"
    return Path("runs") / f"audit-{target.stem}"


def cmd_audit(args: argparse.Namespace, *, console: Console | None = None) -> int:
    """Handler of ``medfed audit attack``: run the audit, print a summary table and the paths."""
    console = console or Console(stderr=True, soft_wrap=True)
    options = options_from_args(args)
    target = Path(args.target)
    out = Path(args.out) if args.out else _default_out(target)
    result = run_audit(
        target, out_dir=out, options=options, overrides=args.overrides, site=args.site,
        progress=not args.quiet,
    )  # fmt: skip
    report = result.report
    table = Table(title=f"gradient inversion: site {report['site']}, batch {report['batch_size']}")
    for col in ("update", "labels (inferred / true)", "mean SSIM", "mean PSNR", "seconds"):
        table.add_column(col)
    for side, label in ((result.no_dp, "as sent"), (result.dp, _dp_label(report))):
        table.add_row(
            label,
            f"{side.result.labels} / {report['true_labels']}",
            f"{side.mean_ssim:.3f}",
            _fmt_psnr(side.mean_psnr),
            f"{side.result.seconds:.1f}",
        )
    console.print(table)
    console.print(f"[green]wrote[/] {result.json_path} and {result.html_path}")
    return 0


def _dp_label(report: dict[str, Any]) -> str:
    dp = report["dp"]
    return f"DP (C={dp['clip']:g}, σ={dp['noise_multiplier']:g})"
