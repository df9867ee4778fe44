"""Rich progress for long runs: round, site, loss, validation AUC and ETA."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from medfed.history import RoundRecord

log = logging.getLogger("medfed")

_LABELS = {"auc": "AUC", "acc": "acc", "dice": "Dice", "jaccard": "Jaccard"}


class Reporter:
    def __init__(self, *, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True, soft_wrap=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._label = ""

    def start(self, label: str, *, total: int, completed: int = 0) -> None:
        self._label = label
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            f"{label} round", total=total, completed=completed, status=""
        )

    def site(self, site: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, status=f"training at {site}")

    def round_done(self, rec: RoundRecord) -> None:
        losses = [s.train_loss for s in rec.sites.values()]
        loss = sum(losses) / len(losses) if losses else float("nan")
        # The first two metrics of the task (AUC and accuracy, or Dice and Jaccard).
        shown = list(rec.val)[:2]
        val = "  ".join(f"{_LABELS.get(k, k)} {rec.val[k]:.3f}" for k in shown)
        head = shown[0] if shown else ""
        ext = rec.external or {}
        msg = (
            f"{self._label} round {rec.round + 1}: loss {loss:.4f}  val {val}"
            + (f"  external {_LABELS.get(head, head)} {ext[head]:.3f}" if head in ext else "")
            + (f"  rejected {len(rec.rejected)}" if rec.rejected else "")
            + f"  {rec.seconds:.1f}s"
        )
        if self._progress is not None and self._task is not None:
            status = f"val {_LABELS.get(head, head)} {rec.val[head]:.3f}" if head else ""
            self._progress.update(self._task, advance=1, status=status)
            self._progress.console.print(msg)

    def warn(self, message: str) -> None:
        log.warning(message)
        if self.enabled:
            self.console.print(f"[yellow]{message}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
