"""The one metrics sink every loop writes to: RUN/metrics.jsonl on the main rank, and the
experiment trackers of `train.report_to` (TensorBoard, W&B) fed the same rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dxcli.base.errors import Interrupted
from dxcli.runtime import trackers as trackmod


class MetricsLog:
    """Appends one JSON line per logged step to RUN/metrics.jsonl (rank 0 only) and hands the
    row's numbers to each tracker as scalars at the row's `step`.

    Use it as a context manager: the trackers' writers are closed (flushed, W&B run finished)
    when the loop ends, also when it ends by an exception.
    """

    def __init__(self, path: Path, enabled: bool, report_to: Sequence[str] = (),
                 config: dict[str, Any] | None = None):
        self.path = Path(path)
        self.enabled = enabled
        # other ranks open nothing: one event file and one W&B run per training run
        self.trackers = trackmod.open_trackers(report_to, self.path.parent, config) if enabled else []

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        # the trackers get the figures metrics.jsonl holds, so the two never disagree
        step = clean.get("step")
        for tracker in self.trackers:
            tracker.log(trackmod.scalars(clean), step if isinstance(step, int) else None)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)
        self.trackers = []

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # a crash-simulation stop (SystemExit) or a Ctrl-C that saved a checkpoint is a clean end
        # for the trackers, not a failure
        self.close(failed=exc_type is not None and not issubclass(exc_type, (SystemExit, Interrupted)))

    def drop_after(self, step: int) -> None:
        """Forget rows logged after `step`: a resumed run logs those steps again, each once."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and _step_of(line) <= step]
        if len(kept) != len(lines):
            self.path.write_text("".join(kept), encoding="utf-8")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):  # a torn last line from a crash: drop it
        return 1 << 62
