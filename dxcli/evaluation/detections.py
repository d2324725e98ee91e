"""What `dx detect` reads and yields, without torch: the inputs expanded to image paths, and the
Detection row. The model-side detector (`detect`) and the server's client (`detect_client`) share
them, and the client must start in a fraction of a second."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from dxcli.base.errors import UsageError
from dxcli.base.images import IMAGE_EXTS


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders walked for images (sorted), glob patterns expanded. A missing file
    among others stays in the list (its detection is an error row); all missing is a usage error."""
    paths: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        elif path.exists():
            paths.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise UsageError(f"{item}: the pattern matches no file")
            paths += matches
        else:
            missing.append(item)
            paths.append(path)  # detect reports it in its row, and the other images still run
    if len(missing) == len(inputs):
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    if not paths:
        raise UsageError("no images to check")
    return paths


@dataclass
class Detection:
    path: str
    verdict: str | None
    head_prob: float | None
    reasoning: str | None
    seconds: float
    error: str | None = None

    def to_json(self) -> dict:
        return {"image": self.path, "verdict": self.verdict, "head_prob": self.head_prob,
                "reasoning": self.reasoning, "seconds": round(self.seconds, 3), "error": self.error}
