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

from dxcli.base.answer import answer_span

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

    The definition: token i ends where the decoding of ids[:i+1] stops agreeing with the decoding
    of all ids, and starts where token i-1 ended. This follows the ids the model generated (a
    re-tokenization of the text can split differently), is exact for byte-level BPE (a token
    holding part of a UTF-8 character is given that character) and for SentencePiece/Metaspace
    decoders (their leading-space rule applies to prefixes and to the whole text alike).
    Special tokens decode to nothing: empty spans.

    Decoding every prefix costs time quadratic in the length, so spans are first computed from
    short windows (each token decoded after `_WINDOW` tokens of context, linear time), then
    checked against the definition every `_CHECK_EVERY` tokens and at the end; any disagreement
    falls back to decoding every prefix.
    """
    ids = [int(i) for i in token_ids]
    text = decode_response(tokenizer, ids)
    if not ids:
        return text, []
    spans = _windowed_spans(tokenizer, ids, text)
    return text, spans if spans is not None else _prefix_spans(tokenizer, ids, text)


_WINDOW = 16  # tokens of context: decoders only look back a few tokens (bytes of one character)
_CHECK_EVERY = 32
_GARBAGE = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


def _prefix_end(prefix: str, text: str) -> int:
    """How many characters of `text` the decoding of a prefix of the ids has produced."""
    return len(prefix) if text.startswith(prefix) else _common_prefix_len(prefix, text)


def _prefix_spans(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Spans by the definition: decode every prefix (one batched decode)."""
    prefixes = _decode_many(tokenizer, [ids[: i + 1] for i in range(len(ids))])
    spans, done = [], 0
    for prefix in prefixes:
        common = _prefix_end(prefix, text)
        end = max(common, done)
        if end == done and len(prefix) > common and done < len(text):
            spans.append((done, done + 1))  # bytes of a character not yet complete: they build it
            continue
        spans.append((done, end))
        done = end
    return spans


def _windowed_spans(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]] | None:
    """Spans from each token's text after a short window of context; None when unverified."""
    windows = []
    for i in range(len(ids)):
        context = ids[max(0, i - _WINDOW) : i]
        windows += [context, context + [ids[i]]]
    decoded = _decode_many(tokenizer, windows)
    spans, pieces, ends, done, owed = [], [], [], 0, 0
    for before, after in zip(decoded[0::2], decoded[1::2]):
        before_text, after_text = before.rstrip(_GARBAGE), after.rstrip(_GARBAGE)
        common = min(_common_prefix_len(before, after), len(before_text))
        # text already given to earlier tokens that this token turned back into bytes (a byte
        # run that stopped being valid UTF-8): it comes back later and is not counted twice
        owed += len(before_text) - common
        piece = after_text[common:]
        skip = min(owed, len(piece))
        piece, owed = piece[skip:], owed - skip
        if not piece and after.endswith(_GARBAGE) and done < len(text):
            spans.append((done, done + 1))  # bytes of a character not yet complete
        else:
            spans.append((done, done + len(piece)))
        pieces.append(piece)
        done += len(piece)
        ends.append(done)
    if "".join(pieces) != text:
        return None
    checks = sorted(set(range(_CHECK_EVERY - 1, len(ids), _CHECK_EVERY)) | {len(ids) - 1})
    prefixes = _decode_many(tokenizer, [ids[: c + 1] for c in checks])
    for c, prefix in zip(checks, prefixes):
        # a prefix ending inside a character cannot be checked on its own (by the definition its
        # end also depends on the tokens before it); the next checkpoint covers it
        if _prefix_end(prefix, text) != ends[c] and not prefix.endswith(_GARBAGE):
            return None
    return spans


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
