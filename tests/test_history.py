import json

from medfed.history import History


def test_resume_drops_later_and_half_written_rows(tmp_path):
    path = tmp_path / "history.jsonl"
    rows = [{"round": r, "val_auc": 0.5 + r / 10} for r in range(4)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "val_a'  # killed mid-write
    path.write_text(text)
    hist = History.resume(path, upto_round=1)
    assert [r["round"] for r in hist] == [0, 1]
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [0, 1]
