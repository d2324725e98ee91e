"""The one answer parser: the verdict is the word after the *last* answer marker."""

from __future__ import annotations

import re

LABELS = ("real", "fake")
HEAD_THRESHOLD = 0.5  # the binary head says fake when P(fake) >= this
ANSWER_RE = re.compile(r"answer\s*[*_]*\s*[:\uff1a]\s*[*_`\"']*\s*(real|fake)\b", re.IGNORECASE)


def parse_answer(text: str | None) -> str | None:
    """'real', 'fake', or None when no marker is present. Never guessed from other words."""
    if not text:
        return None
    matches = ANSWER_RE.findall(text)
    return matches[-1].lower() if matches else None


def _last_marker(text: str | None) -> re.Match | None:
    last = None
    for last in ANSWER_RE.finditer(text or ""):
        pass
    return last


def answer_span(text: str) -> tuple[int, int] | None:
    """Character span of the last answer marker (used to find the final paragraph)."""
    last = _last_marker(text)
    return last.span() if last else None


def verdict_span(text: str) -> tuple[int, int] | None:
    """Character span of the verdict word (`real`/`fake`) after the last answer marker."""
    last = _last_marker(text)
    return last.span(1) if last else None


def label_to_int(label: str) -> int:
    """Positive class is fake."""
    return 1 if label == "fake" else 0


def head_verdict(prob: float) -> str:
    """The binary head's verdict for P(fake) = `prob` (a tie at the threshold is fake)."""
    return "fake" if prob >= HEAD_THRESHOLD else "real"
