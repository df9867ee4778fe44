"""The study's warm start: each architecture trains once on public data before any private run.

Runs before the study's own runs and lands in ``<study>/pretrain/<model>/`` as an ordinary
centralized run (checkpoints, resume, ``final.safetensors``), so an interrupted study does not
pretrain again and a finished pretraining is reused as long as its config is unchanged. Every
network of that architecture - with or without DP - then starts from the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from medfed.config import DataSource
from medfed.data.site import Federation
from medfed.engine import load_federation
from medfed.study import runs
from medfed.study.config import StudyConfig, slugify


class PretrainError(ValueError):
    """The public data cannot pretrain this study's networks (wrong task or channels, empty)."""


def pretrain_dir(out_dir: Path, model: str) -> Path:
    return out_dir / "pretrain" / (slugify(model) or "model")


def warm_start(
    config: StudyConfig, out_dir: Path, private: Federation, *, console: Console, progress: bool
) -> dict[str, Path]:
    """Pretrain every architecture of ``config`` on ``config.pretrain.data``.

    Returns model name -> its weights. Absolute paths: a run's config records where it started
    from, and the study may be resumed from another working directory.
    """
    if config.pretrain is None:
        return {}
    console.print("[bold]Preparing the public pretraining data[/]")
    fed, _ = load_federation(config.pretrain.data)
    _check(fed, private, config)
    weights: dict[str, Path] = {}
    for model in dict.fromkeys(n.model.name for n in config.networks):
        run_cfg = config.pretrain_config(model)
        run_dir = pretrain_dir(out_dir, model).resolve()
        console.print(
            f"[bold cyan]pretrain[/] {model} · centralized on {', '.join(fed.names)} · "
            f"{config.pretrain.epochs} epochs"
        )
        runs.train_or_reuse(run_cfg, run_dir, fed, progress=progress, tag="pretrain ")
        weights[model] = run_dir / runs.FINAL
    return weights


def _check(fed: Federation, private: Federation, config: StudyConfig) -> None:
    """Refuse, before any training, public data whose weights the study could not load."""
    try:
        fed.check_task(config.task)
    except ValueError as err:
        raise PretrainError(f"pretrain.data: {err}") from None
    if not any(len(s.train) for s in fed.sites):
        raise PretrainError("pretrain.data holds no training images")
    if fed.in_chans != private.in_chans:
        raise PretrainError(
            f"pretrain.data has {fed.in_chans}-channel images, the study's data "
            f"{private.in_chans}-channel: the pretrained first layer would not fit"
        )


def pretrain_meta(config: StudyConfig, out_dir: Path) -> dict[str, Any] | None:
    """What the report says about the warm start: data, size, epochs and its own validation."""
    if config.pretrain is None:
        return None
    models: dict[str, Any] = {}
    for model in dict.fromkeys(n.model.name for n in config.networks):
        run_dir = pretrain_dir(out_dir, model)
        summary = runs.summary(run_dir)
        models[model] = {
            "run": str(run_dir.relative_to(out_dir)),
            "train_images": runs.timing(run_dir)["train_images"] // config.pretrain.epochs,
            "val": summary.get("val") or {},
        }
    data = config.pretrain.data
    cohort = data.histology.cohort if data.source is DataSource.SYNTHETIC_HISTOLOGY else None
    return {
        "source": str(data.source) + (f" ({cohort} cohort)" if cohort is not None else ""),
        "epochs": config.pretrain.epochs,
        "models": models,
    }
