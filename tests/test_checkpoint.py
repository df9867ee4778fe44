import json

import torch
from safetensors.torch import load_file

from medfed.checkpoint import list_checkpoints, load_latest, save_checkpoint
from medfed.types import StrategyState


def _save(tmp_path, r, keep_last=2):
    g = {"w": torch.full((2, 2), float(r)), "n": torch.tensor(r, dtype=torch.long)}
    state = StrategyState(round=r, buffers={"m": {"w": torch.ones(2, 2) * r}}, scalars={"t": r / 2})
    cs = {"site-a": {"bn": {"w": torch.arange(3.0) + r}}, "site-b": {}}
    return save_checkpoint(
        tmp_path,
        round_idx=r,
        global_params=g,
        state=state,
        client_states=cs,
        meta={"config_hash": "abc"},
        keep_last=keep_last,
    )


def test_round_trip(tmp_path):
    _save(tmp_path, 0)
    _save(tmp_path, 1)
    ck = load_latest(tmp_path)
    assert ck.round_idx == 1
    assert torch.equal(ck.global_params["w"], torch.full((2, 2), 1.0))
    assert ck.global_params["n"].dtype == torch.long and int(ck.global_params["n"]) == 1
    assert torch.equal(ck.state.buffers["m"]["w"], torch.ones(2, 2))
    assert ck.state.scalars == {"t": 0.5} and ck.state.round == 1
    assert torch.equal(ck.client_states["site-a"]["bn"]["w"], torch.arange(3.0) + 1)
    assert "site-b" not in ck.client_states  # nothing to keep -> no file
    assert ck.meta["config_hash"] == "abc"


def test_files_are_safetensors_and_json_not_pickle(tmp_path):
    path = _save(tmp_path, 0)
    for f in path.rglob("*.safetensors"):
        load_file(str(f))  # would raise on a pickle
    json.loads((path / "state.json").read_text())
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.pkl"))


def test_keep_last_prunes_and_ignores_partial_dirs(tmp_path):
    for r in range(4):
        _save(tmp_path, r)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["round_0002", "round_0003"]
    # A half-written checkpoint (crash mid-save) is never taken as the latest.
    (tmp_path / "checkpoints" / ".tmp_round_0004").mkdir()
    assert load_latest(tmp_path).round_idx == 3


def test_no_checkpoint(tmp_path):
    assert load_latest(tmp_path) is None
