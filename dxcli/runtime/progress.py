"""Progress of long work: a rich bar on a terminal, plain throttled lines otherwise; main rank only."""

from __future__ import annotations

import sys
import time
from typing import Any


def _two_line_progress(console: Any = None) -> Any:
    """A rich Progress whose first line always fits 80 columns (name, bar, count, elapsed, ETA) and
    whose second line carries the metrics, cut at the terminal's width rather than squeezing the bar."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class TwoLineProgress(Progress):
        info = ""

        def get_renderables(self):
            yield self.make_tasks_table(self.tasks)
            if self.info:
                yield Text(self.info, no_wrap=True, overflow="ellipsis", style="dim")

    return TwoLineProgress(TextColumn("[bold]{task.description:.10}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                           TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                           transient=False)


class ProgressView:
    """Rank 0 draws a rich progress bar on a TTY, plain log lines otherwise; other ranks stay quiet."""

    def __init__(self, total: int, description: str, enabled: bool, start: int = 0, console: Any = None):
        self.enabled = enabled
        self.total = total
        self.description = description
        self.tty = console is not None or sys.stderr.isatty()
        self.started = time.time()
        self.start_step = start
        self._progress = None
        self._last_line, self._last_step = time.time(), start
        if enabled and self.tty:
            self._progress = _two_line_progress(console)
            self._task = self._progress.add_task(description, total=total, completed=start)
            self._progress.start()

    def update(self, step: int, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        if self._progress is not None:
            self._progress.info = text
            self._progress.update(self._task, completed=step)
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
