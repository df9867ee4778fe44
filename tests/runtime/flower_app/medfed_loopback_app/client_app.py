"""ClientApp: add this node's configured ``number`` to the received array."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def add_number(msg: Message, context: Context) -> Message:
    values = msg.content.array_records["values"]["x"].numpy()
    number = float(context.node_config["number"])
    reply = RecordDict(
        {
            "values": ArrayRecord({"x": Array(values + number)}),
            "meta": MetricRecord({"number": number}),
        }
    )
    return Message(reply, reply_to=msg)
