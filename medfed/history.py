"""Per-round history, one JSON object per line in ``history.jsonl``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SiteRound:
    train_loss: float
    examples: int
    steps: int


@dataclass(frozen=True)
class RoundRecord:
    round: int
    participants: list[str]
    sites: dict[str, SiteRound]
    val_auc: float
    val_acc: float
    site_val: dict[str, dict[str, float]]
    rejected: dict[str, str]
    bytes_up: int
    bytes_down: int
    seconds: float
    external_auc: float | None = None
    external_acc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True)


class History:
    """Rounds completed so far; ``path`` (if given) mirrors them on disk as JSON lines."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def append(self, record: RoundRecord) -> None:
        self.records.append(json.loads(record.to_json()))
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(record.to_json() + "\n")
                fh.flush()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def last(self) -> dict[str, Any] | None:
        return self.records[-1] if self.records else None

    @classmethod
    def resume(cls, path: Path, *, upto_round: int) -> History:
        """Reload rows up to a checkpointed round, dropping later or half-written lines."""
        hist = cls(path)
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("round", 1 << 30) <= upto_round:
                    hist.records.append(row)
        path.write_text("".join(json.dumps(r) + "\n" for r in hist.records))
        return hist

    @classmethod
    def load(cls, path: Path) -> History:
        hist = cls(None)
        hist.records = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        return hist
