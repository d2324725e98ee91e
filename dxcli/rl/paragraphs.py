"""Paragraphs of a response, their character spans, and which paragraph each token belongs to.

Spans tile the response: a paragraph's span runs from its first character (0 for the first
paragraph, so leading whitespace is included) to the first character of the next paragraph, so
the blank-line separator after a paragraph belongs to it. Every character, and therefore every
generated token, has exactly one paragraph.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dxcli.answer import answer_span

PARAGRAPH_SEPARATOR = re.compile(r"\n\s*\n")


@dataclass
class Paragraph:
    text: str  # stripped paragraph text
    start: int  # span in the response, separator after the paragraph included
    end: int
    is_final: bool  # holds the last answer marker (else: the last paragraph)


def split_paragraphs(response: str) -> list[Paragraph]:
    """Split on blank lines, drop empty pieces, keep spans that tile the whole response.

    A blank response gives one empty final paragraph, so its tokens (an EOS at least) still have
    a paragraph to belong to.
    """
    pieces, cursor = [], 0
    for separator in PARAGRAPH_SEPARATOR.finditer(response):
        pieces.append((cursor, separator.start()))
        cursor = separator.end()
    pieces.append((cursor, len(response)))
    kept = [(s, e) for s, e in pieces if response[s:e].strip()]
    if not kept:
        return [Paragraph("", 0, len(response), True)]
    starts = [0] + [s for s, _ in kept[1:]]
    ends = starts[1:] + [len(response)]
    final = _final_index(response, starts)
    return [
        Paragraph(response[s:e].strip(), start, end, index == final)
        for index, ((s, e), start, end) in enumerate(zip(kept, starts, ends))
    ]


def _final_index(response: str, starts: list[int]) -> int:
    """The paragraph holding the verdict word of the last answer marker, else the last one."""
    span = answer_span(response)
    if span is None:
        return len(starts) - 1
    return bisect_right(starts, span[1] - 1) - 1


def paragraph_of(paragraphs: Sequence[Paragraph], char: int) -> int:
    """Index of the paragraph whose span holds character `char` (past the end: the last)."""
    starts = [p.start for p in paragraphs]
    return max(0, bisect_right(starts, char) - 1)


def token_paragraph_ids(
    paragraphs: Sequence[Paragraph],
    offsets: Sequence[tuple[int, int]],
    n_tokens: int,
    text: str | None = None,
) -> list[int]:
    """One paragraph index per generated token.

    A token goes to the paragraph holding its first character, or, when `text` is given, its
    first non-whitespace character (so " The" after a blank line goes with "The", and a token
    of separator whitespace goes to the paragraph before). Tokens with an empty span (special
    tokens) go to the previous token's paragraph, leading ones to the first paragraph, and
    everything after the last token with text (EOS, padding, ids beyond `offsets`) to the last.
    """
    if not paragraphs:
        raise ValueError("no paragraphs: split_paragraphs always returns at least one")
    if len(offsets) > n_tokens:
        raise ValueError(f"{len(offsets)} offsets for {n_tokens} tokens")
    starts = [p.start for p in paragraphs]
    last = len(paragraphs) - 1
    with_text = [index for index, (s, e) in enumerate(offsets) if e > s]
    tail_from = with_text[-1] + 1 if with_text else 0
    ids: list[int] = []
    for s, e in offsets[:tail_from]:
        if e > s:
            anchor = s if text is None else _first_visible(text, s, e)
            ids.append(max(0, bisect_right(starts, anchor) - 1))
        else:
            ids.append(ids[-1] if ids else 0)
    return ids + [last] * (n_tokens - len(ids))


def _first_visible(text: str, start: int, end: int) -> int:
    piece = text[start:end]
    stripped = piece.lstrip()
    return start + len(piece) - len(stripped) if stripped else start


def decode_response(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """The response text the rewards see: special tokens (EOS, padding) dropped, no cleanup.

    `map_tokens` splits exactly this text, so score it (not another decoding) with the rewards.
    """
    return _decode_many(tokenizer, [[int(i) for i in token_ids]])[0]


def _decode_many(tokenizer: Any, sequences: list[list[int]]) -> list[str]:
    """Decode a batch the same way every time; the Rust batch decoder when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(sequences, skip_special_tokens=True)
    return tokenizer.batch_decode(sequences, skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)


def token_char_spans(tokenizer: Any, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(response text, one character span per generated id), exact for the ids as generated.

    Spans come from decoding every prefix ids[:i+1] (one batched decode) rather than from
    re-tokenizing the text, which can split differently than the model generated (cost: about
    0.1 s for 1024 tokens on one CPU core, quadratic in the length). Decoding
    prefixes is exact for byte-level BPE (a token holding part of a UTF-8 character is given that
    character) and for SentencePiece/Metaspace decoders (their leading-space rule applies to
    prefixes and to the whole text alike). Special tokens decode to nothing: empty spans.
    """
    ids = [int(i) for i in token_ids]
    if not ids:
        return decode_response(tokenizer, ids), []
    prefixes = _decode_many(tokenizer, [ids[: i + 1] for i in range(len(ids))])
    text = prefixes[-1]
    spans, done = [], 0
    for prefix in prefixes:
        common = len(prefix) if text.startswith(prefix) else _common_prefix_len(prefix, text)
        end = max(common, done)
        if end == done and len(prefix) > common and done < len(text):
            end = done + 1  # bytes of a character not yet complete: they belong to it
            spans.append((done, end))
            continue
        spans.append((done, end))
        done = end
    return text, spans


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search on C-level slice compares)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def map_tokens(tokenizer: Any, token_ids: Sequence[int]) -> tuple[list[Paragraph], list[int]]:
    """Paragraphs of the decoded response and the paragraph index of every generated id.

    Pass the generated ids of one response (EOS and right padding may be included: they go to
    the last paragraph). The paragraphs are those of `decode_response(tokenizer, token_ids)`.
    """
    text, spans = token_char_spans(tokenizer, token_ids)
    paragraphs = split_paragraphs(text)
    return paragraphs, token_paragraph_ids(paragraphs, spans, len(spans), text)
