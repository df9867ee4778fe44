"""A study's runs: training one (or reusing it when done) and reading its files.

A study never re-derives what a run already recorded: wall time, bytes moved and the per-round
validation metrics come from the run's own files, so the study and ``medfed run`` agree by
construction. Every reader names the run folder when a file is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medfed.checkpoint import load_latest, load_params
from medfed.config import RunConfig, config_hash
from medfed.data.site import Federation
from medfed.engine import run as run_engine
from medfed.history import History
from medfed.types import Params

FINAL = "final.safetensors"


class RunFilesError(RuntimeError):
    """A run folder lacks a file the study needs (the run did not finish)."""


def train_or_reuse(
    run_cfg: RunConfig, run_dir: Path, fed: Federation, *, progress: bool, tag: str
) -> None:
    """Train ``run_cfg`` into ``run_dir``: skipped when done with this config, else resumed."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        done = json.loads(summary.read_text())
        if done.get("config_hash") == config_hash(run_cfg):
            return
    resume = (run_dir / "config.yaml").is_file()
    run_engine(run_cfg, out_dir=run_dir, resume=resume, federation=fed, progress=progress, tag=tag)


def rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The run's history rows; empty when it recorded none."""
    path = run_dir / "history.jsonl"
    return History.load(path).records if path.is_file() else []


def summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise RunFilesError(f"{path}: not found; the run did not finish")
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def timing(run_dir: Path) -> dict[str, float]:
    images = sum(site["examples"] for row in rounds(run_dir) for site in row["sites"].values())
    seconds = float(summary(run_dir)["wall_seconds"])
    return {
        "seconds": seconds,
        "train_images": int(images),
        "images_per_s": images / seconds if seconds > 0 else 0.0,
    }


def communication(run_dir: Path) -> dict[str, float]:
    rows = rounds(run_dir)
    up = sum(int(r["bytes_up"]) for r in rows)
    down = sum(int(r["bytes_down"]) for r in rows)
    return {
        "rounds": len(rows),
        "bytes_up": up,
        "bytes_down": down,
        "bytes_per_round": (up + down) / len(rows) if rows else 0.0,
    }


def final_params(run_dir: Path) -> Params:
    """The model a peer or one-shot run hands over: the consensus (cyclic, gossip) or the
    distilled student (one-shot), as the run wrote it."""
    path = run_dir / FINAL
    if not path.is_file():
        raise RunFilesError(f"{path}: not found; the run did not finish")
    return load_params(path)


def peer_site_models(run_dir: Path) -> dict[str, Params]:
    """Each site's own final model, from the peer run's last checkpoint (its site states)."""
    from medfed.peer import Slot  # lazy: medfed.peer imports the engine

    ckpt = load_latest(run_dir)
    if ckpt is None:
        raise RunFilesError(f"{run_dir}: no checkpoint; the run did not complete a round")
    missing = sorted(s for s, cs in ckpt.client_states.items() if Slot.MODEL not in cs)
    if missing or not ckpt.client_states:
        raise RunFilesError(f"{run_dir}: the last checkpoint holds no model for sites {missing}")
    return {site: dict(cs[Slot.MODEL]) for site, cs in ckpt.client_states.items()}
