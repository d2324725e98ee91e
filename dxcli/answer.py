"""The one answer parser: the verdict is the word after the *last* answer marker."""

from __future__ import annotations

import re

LABELS = ("real", "fake")
ANSWER_RE = re.compile(r"answer\s*[*_]*\s*[:\uff1a]\s*[*_`\"']*\s*(real|fake)\b", re.IGNORECASE)


def parse_answer(text: str | None) -> str | None:
    """'real', 'fake', or None when no marker is present. Never guessed from other words."""
    if not text:
        return None
    matches = ANSWER_RE.findall(text)
    return matches[-1].lower() if matches else None


def answer_span(text: str) -> tuple[int, int] | None:
    """Character span of the last answer marker (used to find the final paragraph)."""
    last = None
    for last in ANSWER_RE.finditer(text or ""):
        pass
    return (last.start(), last.end()) if last else None


def label_to_int(label: str) -> int:
    """Positive class is fake."""
    return 1 if label == "fake" else 0
