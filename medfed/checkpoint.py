"""Round checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of ``RUN_DIR/checkpoints/round_NNNN/``::

    global.safetensors      the global model after that round
    strategy.safetensors    strategy buffers, keys "<group>/<param>"
    sites/<site>.safetensors  state each site keeps (FedBN's BN, SCAFFOLD's c_i); site-local
    state.json              round, strategy scalars, seed scheme, config hash, history length

A directory is renamed into place only when complete, so a crash mid-write leaves the previous
round as the latest checkpoint. No pickle anywhere: loading a checkpoint cannot execute code.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medfed.types import Buffers, ClientState, Params, StrategyState

_ROUND_DIR = re.compile(r"^round_(\d{4,})$")


def _flatten(groups: Buffers) -> dict[str, torch.Tensor]:
    out = {}
    for group, tensors in groups.items():
        if "/" in group:
            raise ValueError(f"buffer group name may not contain '/': {group!r}")
        for key, t in tensors.items():
            out[f"{group}/{key}"] = t.detach().cpu().contiguous().clone()
    return out


def _unflatten(flat: Mapping[str, torch.Tensor]) -> dict[str, Params]:
    out: dict[str, Params] = {}
    for name, t in flat.items():
        group, _, key = name.partition("/")
        out.setdefault(group, {})[key] = t
    return out


def save_params(params: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in params.items()}, str(path))


def load_params(path: Path) -> Params:
    return dict(load_file(str(path)))


@dataclass(frozen=True)
class Checkpoint:
    round_idx: int  # last completed round (0-based)
    global_params: Params
    state: StrategyState
    client_states: Mapping[str, ClientState]
    meta: dict[str, Any]


def save_checkpoint(
    run_dir: Path,
    *,
    round_idx: int,
    global_params: Params,
    state: StrategyState,
    client_states: Mapping[str, ClientState],
    meta: Mapping[str, Any],
    keep_last: int,
) -> Path:
    final = checkpoint_dir(run_dir, round_idx)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "sites").mkdir(parents=True)
    save_params(global_params, tmp / "global.safetensors")
    save_file(_flatten(state.buffers), str(tmp / "strategy.safetensors"))
    for site, cs in client_states.items():
        if cs:
            save_file(_flatten(cs), str(tmp / "sites" / f"{site}.safetensors"))
    doc = {
        "round": round_idx,
        "strategy": {"round": state.round, "scalars": dict(state.scalars)},
        **meta,
    }
    (tmp / "state.json").write_text(json.dumps(doc, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(run_dir: Path, round_idx: int) -> Path:
    """Where round ``round_idx``'s checkpoint lives (whether or not it was written)."""
    return run_dir / "checkpoints" / f"round_{round_idx:04d}"


def checkpoint_round(path: Path) -> int | None:
    """The round a checkpoint folder holds, from its name; None for anything else."""
    m = _ROUND_DIR.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest round first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_round(p) is not None]
    return sorted(found, key=lambda p: checkpoint_round(p) or 0)


def load_checkpoint(path: Path) -> Checkpoint:
    doc = json.loads((path / "state.json").read_text())
    client_states = {
        f.stem: _unflatten(load_file(str(f)))
        for f in sorted((path / "sites").glob("*.safetensors"))
    }
    state = StrategyState(
        round=int(doc["strategy"]["round"]),
        buffers=_unflatten(load_file(str(path / "strategy.safetensors"))),
        scalars=dict(doc["strategy"]["scalars"]),
    )
    return Checkpoint(
        round_idx=int(doc["round"]),
        global_params=load_params(path / "global.safetensors"),
        state=state,
        client_states=client_states,
        meta=doc,
    )


def load_latest(run_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    return load_checkpoint(found[-1]) if found else None
