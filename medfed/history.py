"""Per-round history, one JSON object per line in ``history.jsonl``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfed.config import RunConfig


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
    val: dict[str, float]  # pooled internal validation: {auc, acc} or {dice, jaccard, ...}
    site_val: dict[str, dict[str, float]]
    rejected: dict[str, str]
    bytes_up: int
    bytes_down: int
    seconds: float
    external: dict[str, float] | None = None
    privacy: dict[str, Any] | None = None  # DP: ε per site so far, δ, σ, C (see medfed.privacy)
    extra: dict[str, Any] = field(default_factory=dict)

    # Flat classification keys, kept in every row so readers of older histories keep working.
    @property
    def val_auc(self) -> float | None:
        return self.val.get("auc")

    @property
    def val_acc(self) -> float | None:
        return self.val.get("acc")

    @property
    def external_auc(self) -> float | None:
        return None if self.external is None else self.external.get("auc")

    @property
    def external_acc(self) -> float | None:
        return None if self.external is None else self.external.get("acc")

    def to_json(self) -> str:
        row = asdict(self)
        row |= {
            "val_auc": self.val_auc,
            "val_acc": self.val_acc,
            "external_auc": self.external_auc,
            "external_acc": self.external_acc,
        }
        return json.dumps(row, allow_nan=True)


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


def run_summary(history: History, config: RunConfig, chash: str, wall: float) -> dict[str, Any]:
    """``summary.json`` of a finished run: the last round's scores and the run's totals."""
    last = history.last or {}
    rejected_total: dict[str, int] = {}
    for row in history:
        for site in row["rejected"]:
            rejected_total[site] = rejected_total.get(site, 0) + 1
    return {
        "name": config.name,
        "paradigm": str(config.paradigm),
        "task": str(config.task),
        "strategy": config.federation.strategy.name,
        "model": config.model.name,
        "rounds": len(history),
        "val": last.get("val", {}),
        "external": last.get("external"),
        "val_auc": last.get("val_auc"),
        "val_acc": last.get("val_acc"),
        "external_auc": last.get("external_auc"),
        "external_acc": last.get("external_acc"),
        "site_val": last.get("site_val", {}),
        "rejected_rounds": rejected_total,
        "privacy": last.get("privacy"),
        "bytes_up": sum(r["bytes_up"] for r in history),
        "bytes_down": sum(r["bytes_down"] for r in history),
        "wall_seconds": wall,
        "config_hash": chash,
    }
