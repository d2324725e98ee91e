"""PRPO paragraph rewards (METHOD.md §9-§10): keywords, evidence labels, PCR, and the paragraph
reward from PCR and VCR (VCR's CLIP lives in `dxcli.rl.clip`).

Reward of paragraph j of a response: `R_j = a * VCR_j + b * PCR_j` (a = b = 0.5).
- A response without a parsable answer gets R = 0 on every paragraph.
- When VCR is off (no CLIP, or no image) the VCR term is dropped: `R_j = b * PCR_j`. The weights
  are not renormalised; advantages divide by the standard deviation anyway, so only the relative
  rewards within one image's group matter.
- Paragraphs other than the final one (the one holding the answer) get PCR = 1, including any
  after the answer; only paragraphs before the final one vote for the majority label.
"""

from __future__ import annotations

import difflib
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dxcli.base.answer import ANSWER_RE, LABELS, parse_answer
from dxcli.base.errors import DxError
from dxcli.rl.paragraphs import Paragraph, split_paragraphs

DEFAULT_LEXICON = "lexicon.yaml"  # in this package
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
_CLAUSE_BREAK = re.compile(r"[,;.:!?\n]")
_TERM_SPLIT = re.compile(r"[\s-]+")
_LEXICON_KEYS = ("negation_window", "negation_unit", "section_titles", "verdict_words", "negators",
                 "fake", "real")
NEGATION_UNITS = ("words", "chars")
_SWITCHES = ("section_titles", "verdict_words")
# A paragraph's leading section title, matched on the lowercased text: a markdown heading line, a
# **bold** or __underlined__ phrase with an optional colon, or 1 to 4 plain words and a colon.
_TITLE = re.compile(
    r"\s*(?:#{1,6}[ \t]+[^\n]*"
    r"|\*\*[^*\n]+\*\*[ \t]*:?"
    r"|__[^_\n]+__[ \t]*:?"
    r"|[a-z0-9][\w'-]*(?:[ \t]+[\w'-]+){0,3}[ \t]*:(?=\s|$))"
)


# ------------------------------------------------------------------ keywords


@lru_cache(maxsize=1)
def _yake() -> Any:
    import yake

    return yake.KeywordExtractor(lan="en", n=3, top=1)


def keyword(paragraph: Paragraph, answer: str | None) -> str:
    """The phrase CLIP compares with the image: the answer word for the final paragraph, else
    YAKE's top phrase (n <= 3), else the first three words. Lowercased."""
    if paragraph.is_final and answer:
        return answer
    found = _yake().extract_keywords(paragraph.text) if paragraph.text.strip() else []
    if found:
        phrase = next(item for item in found[0] if isinstance(item, str))
        return phrase.lower()
    return " ".join(_WORD.findall(paragraph.text.lower())[:3])


# ------------------------------------------------------------------ lexicon


def _term_words(term: str) -> tuple[str, ...]:
    return tuple(w for w in _TERM_SPLIT.split(_normalise(term)) if w)


def _normalise(text: str) -> str:
    """Lowercase and straighten apostrophes, keeping every character's position."""
    return text.lower().replace("\u2019", "'").replace("\u2018", "'")


def title_end(lower: str) -> int:
    """Where the leading section title of a (normalised) paragraph ends; 0 when it has none.

    A heading line holding the answer marker ("### Answer: fake") is the verdict, not a title,
    so its verdict word stays visible to the evidence count.
    """
    match = _TITLE.match(lower)
    if match is None or ANSWER_RE.search(match.group(0)):
        return 0
    return match.end()


@dataclass
class Lexicon:
    """Real / fake evidence terms and negators (see lexicon.yaml for the matching rules)."""

    real: list[str]
    fake: list[str]
    negators: list[str]
    # defaults chosen by tests/bench/bench_reward_rules.py and the negation probes (METHOD.md §9)
    negation_window: int = 4
    negation_unit: str = "words"  # words: last N words of the clause; chars: last N characters
    section_titles: bool = False  # False: a paragraph's leading title is not evidence
    verdict_words: bool = False  # False: the bare verdict words ("real", "fake") are not evidence
    source: str = "<memory>"
    _pattern: re.Pattern = field(init=False, repr=False)
    _classes: list[str] = field(init=False, repr=False)
    _verdict: list[bool] = field(init=False, repr=False)
    _single_negators: frozenset = field(init=False, repr=False)
    _multi_negators: list = field(init=False, repr=False)
    _suffix_negators: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        terms: dict[tuple[str, ...], str] = {}
        for cls in LABELS:
            for term in getattr(self, cls):
                words = _term_words(term)
                if not words:
                    raise DxError(f"{self.source}: empty term under '{cls}'")
                if terms.get(words, cls) != cls:
                    raise DxError(f"{self.source}: '{term}' is listed as both real and fake")
                terms[words] = cls
        # longest first: at one position the longest term wins and is counted once
        ordered = sorted(terms, key=lambda words: len(" ".join(words)), reverse=True)
        alternatives = [
            "(" + r"[\s-]+".join(map(re.escape, words)) + r"(?:e?s)?)" for words in ordered
        ]
        self._pattern = re.compile(r"\b(?:" + "|".join(alternatives) + r")\b")
        self._classes = [terms[words] for words in ordered]
        verdicts = {(label,) for label in LABELS}
        self._verdict = [words in verdicts for words in ordered]
        negators = [_term_words(n) for n in self.negators]
        self._suffix_negators = tuple(w[0] for w in negators if len(w) == 1 and w[0].startswith("n'"))
        singles = {w[0] for w in negators if len(w) == 1}
        self._single_negators = frozenset(singles - set(self._suffix_negators))
        self._multi_negators = sorted((w for w in negators if len(w) > 1), key=len, reverse=True)

    def evidence(self, text: str) -> list[tuple[str, str, bool]]:
        """(matched text, class after negation, negated) for every term found, in order."""
        lower = _normalise(text)
        # matches are skipped rather than the title cut off, so positions (and the character
        # window of negation) stay those of the paragraph as written
        skip_until = 0 if self.section_titles else title_end(lower)
        breaks = [m.start() for m in _CLAUSE_BREAK.finditer(lower)]
        found = []
        for match in self._pattern.finditer(lower):
            index = match.lastindex - 1
            if match.start() < skip_until or (self._verdict[index] and not self.verdict_words):
                continue
            cls = self._classes[index]
            negated = self._negated(lower, match.start(), breaks)
            if negated:
                cls = "real" if cls == "fake" else "fake"
            found.append((match.group(0), cls, negated))
        return found

    def _negated(self, lower: str, start: int, breaks: list[int]) -> bool:
        if self.negation_unit == "chars":
            # the original code's rule: a negator anywhere in the last N characters, clause
            # breaks ignored; a word cut by the window's edge counts as the part inside it
            words = _WORD.findall(lower[max(0, start - self.negation_window) : start])
            return any(self._is_negator(word) for word in self._merge_negators(words))
        before = bisect_right(breaks, start - 1)
        clause_start = breaks[before - 1] + 1 if before else 0
        words = _WORD.findall(lower[clause_start:start])
        window = self._merge_negators(words)[-self.negation_window:]
        return any(self._is_negator(word) for word in window)

    def _merge_negators(self, words: list[str]) -> list[str]:
        """Join multi-word negators ("lack of") so each counts as one word of the window."""
        merged, i = [], 0
        while i < len(words):
            for negator in self._multi_negators:
                if tuple(words[i : i + len(negator)]) == negator:
                    merged.append(" ".join(negator))
                    i += len(negator)
                    break
            else:
                merged.append(words[i])
                i += 1
        return merged

    def _is_negator(self, word: str) -> bool:
        if word in self._single_negators or " " in word:
            return True
        return any(word.endswith(suffix) for suffix in self._suffix_negators)


def load_lexicon(path: Path | None = None) -> Lexicon:
    """The lexicon file at `path` (default: the one shipped in dxcli/rl/lexicon.yaml)."""
    if path is None:
        text = resources.files("dxcli.rl").joinpath(DEFAULT_LEXICON).read_text(encoding="utf-8")
        source = DEFAULT_LEXICON
    else:
        path = Path(path)
        if not path.is_file():
            raise DxError(f"{path}: no such lexicon file")
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DxError(f"{source}: malformed YAML ({exc})") from None
    return lexicon_from_dict(data, source)


def lexicon_from_dict(data: Any, source: str = "<memory>") -> Lexicon:
    if not isinstance(data, dict):
        raise DxError(f"{source}: expected a mapping with keys {', '.join(_LEXICON_KEYS)}")
    for key in data:
        if key not in _LEXICON_KEYS:
            close = difflib.get_close_matches(str(key), _LEXICON_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DxError(f"{source}: unknown key '{key}'{hint}")
    lists = {key: _term_list(data, key, source) for key in ("negators", "fake", "real")}
    return Lexicon(real=lists["real"], fake=lists["fake"], negators=lists["negators"],
                   source=source, **_rule_settings(data, source))


def _term_list(data: dict, key: str, source: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not value:
        raise DxError(f"{source}: '{key}' must be a non-empty list of terms")
    for item in value:
        if isinstance(item, bool):
            raise DxError(f"{source}: '{key}' holds {item!r}, YAML's reading of a bare "
                          'no/yes/on/off; quote it ("no")')
        if not isinstance(item, str) or not item.strip():
            raise DxError(f"{source}: '{key}' holds {item!r}; terms must be non-empty strings")
    return [str(item) for item in value]


def _rule_settings(data: dict, source: str) -> dict[str, Any]:
    """The matching-rule keys, checked; a missing key takes `Lexicon`'s default (the measured
    rules: 4 words, titles and bare verdict words not evidence)."""
    defaults = Lexicon.__dataclass_fields__
    window = data.get("negation_window", defaults["negation_window"].default)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise DxError(f"{source}: 'negation_window' must be a positive integer, got {window!r}")
    unit = data.get("negation_unit", defaults["negation_unit"].default)
    if not isinstance(unit, str) or unit not in NEGATION_UNITS:
        raise DxError(f"{source}: 'negation_unit' must be words or chars, got {unit!r}")
    settings: dict[str, Any] = {"negation_window": window, "negation_unit": unit}
    for key in _SWITCHES:
        value = data.get(key, defaults[key].default)
        if not isinstance(value, bool):
            raise DxError(f"{source}: '{key}' must be true or false, got {value!r}")
        settings[key] = value
    return settings


@lru_cache(maxsize=1)
def default_lexicon() -> Lexicon:
    return load_lexicon(None)


# ------------------------------------------------------------------ PCR


def paragraph_label(text: str, lexicon: Lexicon | None = None) -> str | None:
    """'real' or 'fake' when that class has more evidence in `text`; None for none or a tie."""
    counts = Counter(cls for _, cls, _ in (lexicon or default_lexicon()).evidence(text))
    if counts["real"] == counts["fake"]:
        return None
    return "real" if counts["real"] > counts["fake"] else "fake"


def majority_label(labels: list[str | None]) -> str | None:
    """The most frequent non-None label; a tie or no votes gives None."""
    counts = Counter(label for label in labels if label is not None).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def pcr(paragraph_labels: list[str | None], answer: str | None,
        final_index: int | None = None, no_majority: float = 0.0) -> list[float]:
    """Prediction Consistency Reward per paragraph.

    Non-final paragraphs: 1. The final paragraph (default: the last): 1 when `answer` equals the
    majority label of the paragraphs before it, 0 when it differs, `no_majority` when they give
    a tie or no votes (`prpo.pcr_no_majority`). No answer: all 0.
    """
    if answer is None:
        return [0.0] * len(paragraph_labels)
    final = len(paragraph_labels) - 1 if final_index is None else final_index
    majority = majority_label(paragraph_labels[:final])
    value = float(no_majority) if majority is None else float(majority == answer)
    return [value if j == final else 1.0 for j in range(len(paragraph_labels))]


@dataclass
class ResponseScore:
    paragraphs: list[Paragraph]
    keywords: list[str]
    labels: list[str | None]
    pcr: list[float]
    answer: str | None

    @property
    def final_index(self) -> int:
        return next(i for i, p in enumerate(self.paragraphs) if p.is_final)


def score_response(response: str, *, lexicon: Lexicon | None = None,
                   answer_override: str | None = None, keywords: bool = True,
                   no_majority: float = 0.0) -> ResponseScore:
    """Everything about one response the rewards need except VCR (which needs the image).

    `answer_override` replaces the parsed answer (when the caller parsed it already).
    `keywords=False` skips YAKE (keywords only feed VCR): `keywords` is then empty.
    `no_majority`: the final paragraph's PCR when the earlier ones give a tie or no votes.
    """
    paragraphs = split_paragraphs(response)
    answer = answer_override if answer_override is not None else parse_answer(response)
    labels = [paragraph_label(p.text, lexicon) for p in paragraphs]
    final = next(i for i, p in enumerate(paragraphs) if p.is_final)
    return ResponseScore(
        paragraphs=paragraphs,
        keywords=[keyword(p, answer) for p in paragraphs] if keywords else [],
        labels=labels,
        pcr=pcr(labels, answer, final, no_majority),
        answer=answer,
    )


def paragraph_rewards(scores: list[ResponseScore], vcr_values: list[list[float] | None] | None,
                      a: float = 0.5, b: float = 0.5) -> list[list[float]]:
    """R = a * VCR + b * PCR per paragraph; VCR dropped where `vcr_values` (or its entry for a
    response) is None; 0 on every paragraph of a response without an answer."""
    rewards = []
    for index, score in enumerate(scores):
        vcr = None if vcr_values is None else vcr_values[index]
        if score.answer is None:
            rewards.append([0.0] * len(score.paragraphs))
        elif vcr is None:
            rewards.append([b * p for p in score.pcr])
        else:
            if len(vcr) != len(score.pcr):
                raise ValueError(f"response {index}: {len(vcr)} VCR values for "
                                 f"{len(score.pcr)} paragraphs")
            rewards.append([a * float(v) + b * p for v, p in zip(vcr, score.pcr)])
    return rewards
