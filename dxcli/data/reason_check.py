"""dx's reasoning format as a teacher must write it, the teacher's prompt, and the warning for
records without reasoning (`dx dataset reason`, `dx train instruct`).

A reply is kept only in dx's answer format (METHOD.md §3, §8): `min_paragraphs`..`max_paragraphs`
paragraphs separated by blank lines, each starting with a bold title (`**Skin Texture**: ...`),
then `### Answer: <label>` alone as the last paragraph, with one answer marker only, whose
verdict is the image's folder label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dxcli.base.answer import ANSWER_RE, answer_span
from dxcli.base.errors import UsageError
from dxcli.data.records import REASONING_FILE, Record

DEFAULT_PROMPT_FILE = Path(__file__).with_name("reason_prompt.txt")
# METHOD.md §8's paragraph separator; dxcli/rl/paragraphs.py (a layer above data) holds the same
# pattern and tests/test_dataset_reason.py keeps the two equal
PARAGRAPH_SEPARATOR = re.compile(r"\n\s*\n")
BOLD_TITLE = re.compile(r"\*\*[^*\n]+\*\*")  # `**Skin Texture**: ...` and `**Skin Texture:** ...`
THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)  # a reasoning model's scratchpad
ANSWER_LINE_LEFTOVER = "#*_`'\". !"  # what may surround the marker on the answer line


@dataclass(frozen=True)
class ReplyRules:
    min_paragraphs: int = 2  # reasoning paragraphs, the answer line not counted
    max_paragraphs: int = 8


def load_prompt(path: Path | None) -> str:
    path = Path(path) if path is not None else DEFAULT_PROMPT_FILE
    if not path.is_file():
        raise UsageError(f"--prompt {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UsageError(f"--prompt {path} is empty")
    return text


def render_prompt(template: str, label: str, rules: ReplyRules) -> str:
    """Plain placeholders, not str.format: a user's prompt may hold other braces (JSON examples)."""
    values = {"label": label, "min_paragraphs": rules.min_paragraphs, "max_paragraphs": rules.max_paragraphs}
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template.strip()


def clean_reply(text: str | None) -> str:
    """The reply without surrounding whitespace and without a leading <think> block, which
    reasoning models served without a reasoning parser put inline."""
    return THINK_BLOCK.sub("", text or "").strip()


def check_reply(text: str, label: str, rules: ReplyRules, finish_reason: str | None = None) -> str | None:
    """Why `text` is not usable reasoning for an image labelled `label`, or None when it is.
    Every reason starts with its kind and a colon (the summary counts kinds)."""
    if finish_reason == "length":
        return "cut off: the reply reached the token limit (--max-tokens)"
    if not text:
        return "empty: the reply holds no text"
    markers = list(ANSWER_RE.finditer(text))
    if not markers:
        return "no answer: no '### Answer: real|fake' line"
    verdict = markers[-1].group(1).lower()
    if verdict != label:
        return f"wrong label: answers {verdict}, the label is {label}"
    if len(markers) > 1:
        return f"format: {len(markers)} answer markers, one expected"
    paragraphs = [piece.strip() for piece in PARAGRAPH_SEPARATOR.split(text) if piece.strip()]
    if ANSWER_RE.sub("", paragraphs[-1]).strip(ANSWER_LINE_LEFTOVER):
        return "format: '### Answer: <label>' is not alone in the last paragraph"
    reasoning = paragraphs[:-1]
    if not rules.min_paragraphs <= len(reasoning) <= rules.max_paragraphs:
        return (f"paragraphs: {len(reasoning)} reasoning paragraph(s), "
                f"{rules.min_paragraphs} to {rules.max_paragraphs} expected")
    untitled = [number for number, paragraph in enumerate(reasoning, 1) if not BOLD_TITLE.match(paragraph)]
    if untitled:
        return f"format: paragraph {untitled[0]} does not start with a bold title (**Title**: ...)"
    return None


def has_reasoning(answer: str) -> bool:
    """Whether a record's answer holds text besides its answer marker (`### Answer: fake` alone
    has none: instruct then learns the verdict without paragraphs)."""
    span = answer_span(answer)
    before, after = (answer, "") if span is None else (answer[:span[0]], answer[span[1]:])
    return bool((before + after).strip(ANSWER_LINE_LEFTOVER + "\n\t"))


def reasoning_warning(records: list[Record], data: Path | None) -> str | None:
    """One line for `dx train instruct` when records lack reasoning, naming the way to write it."""
    missing = sum(not has_reasoning(record.answer) for record in records)
    if not missing:
        return None
    tree = data is not None and Path(data).is_dir()
    how = f"write it with `dx dataset reason {data if tree else 'ROOT'} --teacher URL --model NAME`"
    if missing == len(records):
        where = f"{data} has no {REASONING_FILE}" if tree else "the records hold answers only"
        return (f"instruct: no record has reasoning ({where}): the model will learn `### Answer: real|fake` "
                f"without paragraphs, and PRPO will have no paragraphs to reward; {how}")
    return (f"instruct: {missing} of {len(records)} records have no reasoning: the model will learn answers "
            f"without paragraphs for those; {how}")
