"""The one metrics sink every loop writes to: RUN/metrics.jsonl on the main rank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON line per logged step to RUN/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")

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
