"""Progress of long work: a rich bar on a terminal, plain throttled lines otherwise; main rank only."""

from __future__ import annotations

import sys
import time
from typing import Any


class ProgressView:
    """Rank 0 draws a rich progress bar on a TTY, plain log lines otherwise; other ranks stay quiet."""

    def __init__(self, total: int, description: str, enabled: bool, start: int = 0):
        self.enabled = enabled
        self.total = total
        self.description = description
        self.tty = sys.stderr.isatty()
        self.started = time.time()
        self.start_step = start
        self._progress = None
        self._last_line, self._last_step = time.time(), start
        if enabled and self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      transient=False)
            self._task = self._progress.add_task(description, total=total, completed=start, info="")
            self._progress.start()

    def update(self, step: int, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=text)
        elif self._due(step):  # no TTY: a plain line per ~10% or 30 s, and the last step
            elapsed = time.time() - self.started
            done = max(step - self.start_step, 1)
            eta = elapsed / done * (self.total - step)
            print(f"[{self.description}] step {step}/{self.total}  {text}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def _due(self, step: int) -> bool:
        now = time.time()
        tenth = max(1, self.total // 10)
        if step >= self.total or now - self._last_line >= 30 or step // tenth > self._last_step // tenth:
            self._last_line, self._last_step = now, step
            return True
        return False

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
