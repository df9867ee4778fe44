"""ServerApp: send a zero array to every node, sum the replies, write JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if bool(cfg["fail"]):
        raise RuntimeError("medfed-loopback-app: deliberate ServerApp failure")

    expected = int(cfg["expected-nodes"])
    deadline = time.monotonic() + float(cfg["wait-seconds"])
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())

    zeros = np.zeros(2, dtype=np.float64)
    messages = [
        Message(RecordDict({"values": ArrayRecord({"x": Array(zeros)})}), node_id, "query")
        for node_id in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=float(cfg["wait-seconds"])))

    total = np.zeros(2, dtype=np.float64)
    numbers: list[float] = []
    errors: list[str] = []
    for reply in replies:
        if reply.has_error():
            errors.append(str(reply.error.reason))
            continue
        total += reply.content.array_records["values"]["x"].numpy()
        numbers.append(float(reply.content.metric_records["meta"]["number"]))

    result = {
        "node_ids": sorted(str(n) for n in node_ids),
        "numbers": sorted(numbers),
        "sum": total.tolist(),
        "errors": errors,
    }
    out = Path(str(cfg["result-path"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result), encoding="utf-8")
