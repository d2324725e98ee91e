"""`detect`: one model load, then verdict + head probability + reasoning per image."""

from __future__ import annotations

import glob
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dxcli.base.answer import head_verdict, parse_answer
from dxcli.base.errors import DxError
from dxcli.base.images import IMAGE_EXTS, load_rgb
from dxcli.base.template import DEFAULT_QUESTION
from dxcli.config import DxConfig
from dxcli.model.checkpoint import load_checkpoint, resolve_model_path
from dxcli.model.generate import encode_images, generate
from dxcli.runtime import env
from dxcli.runtime.dist import from_env


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


def open_detector(model: str | None, config: DxConfig):
    """The model `detect` runs: `model` (a checkpoint or run folder) or the profile's model.path,
    on this machine's GPU when it has one, with the profile's thread count."""
    checkpoint = resolve_model_path(model) or config.model.path
    if checkpoint is None:
        raise DxError("pass --model CHECKPOINT (a dx checkpoint or run folder)")
    env.set_threads(config.hardware.threads)
    bundle = load_checkpoint(checkpoint, attn_implementation=config.model.attn_implementation)
    bundle.model.to(from_env().device).eval()  # Dist.device: cuda when there is a GPU
    return bundle


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
            text, verdict = None, head_verdict(prob)
        yield Detection(str(path), verdict, prob, text, time.time() - started)
