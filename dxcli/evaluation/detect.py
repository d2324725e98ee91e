"""`detect`: one model load, then verdict + head probability + reasoning per image."""

from __future__ import annotations

import glob
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dxcli.answer import parse_answer
from dxcli.data.tree import IMAGE_EXTS
from dxcli.errors import DxError
from dxcli.template import DEFAULT_QUESTION


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders walked for images (sorted), glob patterns expanded."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        elif path.exists():
            paths.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise DxError(f"{item}: the pattern matches no file")
            paths += matches
        else:
            raise DxError(f"{item}: no such file or folder")
    if not paths:
        raise DxError("no images to check")
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


def detect(bundle, paths: list[Path], *, max_new_tokens: int, reasoning: bool = True,
           question: str = DEFAULT_QUESTION) -> Iterator[Detection]:
    """Yield one Detection per path; unreadable files give an error Detection and the loop goes on.

    Without reasoning, only the binary head runs (no text generation), and the verdict is the head's.
    """
    from dxcli.evaluation.generate import encode_images, generate
    from dxcli.training.sft_data import load_rgb

    for path in paths:
        started = time.time()
        try:
            image = load_rgb(path)
        except Exception as exc:  # a corrupt or non-image file: report, keep going
            yield Detection(str(path), None, None, None, time.time() - started, f"{type(exc).__name__}: {exc}")
            continue
        if reasoning:
            gen = generate(bundle, [image], [question], max_new_tokens=max_new_tokens)
            text, prob = gen.texts[0], gen.head_probs[0]
            verdict = parse_answer(text)
        else:
            prob = encode_images(bundle, [image])[1][0]
            text, verdict = None, ("fake" if prob >= 0.5 else "real")
        yield Detection(str(path), verdict, prob, text, time.time() - started)
