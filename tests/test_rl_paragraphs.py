"""Paragraph split, spans, and the token -> paragraph mapping (METHOD.md §8)."""

from __future__ import annotations

import json
import os

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dxcli.rl import paragraphs as paragraphs_module
from dxcli.rl.paragraphs import (
    Paragraph,
    decode_response,
    map_tokens,
    split_paragraphs,
    token_char_spans,
    token_paragraph_ids,
)

CORPUS = [
    "**Skin Texture**: the skin looks overly smooth, with no visible pores.\n\n",
    "**Lighting**: inconsistent lighting on the face; shadows don't match. café 日本 😀\n\n\n",
    "**Background**: natural and authentic, a real photo.\n \n",
    "### Answer: fake",
    "### Answer: real",
] * 40

RESPONSES = [
    "**Skin Texture**: overly smooth.\n\n**Lighting**: inconsistent.\n\n### Answer: fake",
    "\n\n  Leading blank lines.\n\n\n\nMany blank lines between.\n \t\n\nSpaces inside the gap."
    "\n\n### Answer: real\n\n",
    "Emoji 😀 and café 日本 text.\n\n😀 starts this paragraph.\n\n### Answer: fake",
    "One paragraph only, no answer",
    "### Answer: real\n\nA trailing paragraph after the answer.",
]


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained on the spot (no downloads)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/SentencePiece style BPE (metaspace, byte fallback, strip decoder) trained here."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # byte tokens are ordinary vocabulary in Llama, not special tokens
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")


# ------------------------------------------------------------------ split


@pytest.mark.parametrize("response", RESPONSES)
def test_spans_tile_the_response_and_texts_are_stripped(response: str) -> None:
    paragraphs = split_paragraphs(response)
    assert paragraphs[0].start == 0 and paragraphs[-1].end == len(response)
    for before, after in zip(paragraphs, paragraphs[1:]):
        assert before.end == after.start
    for p in paragraphs:
        assert p.text and p.text == p.text.strip()
        assert p.text in response[p.start : p.end]
    assert sum(p.is_final for p in paragraphs) == 1


def test_split_drops_empty_pieces_and_gives_separators_to_the_paragraph_before() -> None:
    response = "\n\n  First.\n\n\n\nSecond.\n \t\n\nThird.\n\n"
    paragraphs = split_paragraphs(response)
    assert [p.text for p in paragraphs] == ["First.", "Second.", "Third."]
    assert response[paragraphs[0].start : paragraphs[0].end] == "\n\n  First.\n\n\n\n"
    assert response[paragraphs[1].start : paragraphs[1].end] == "Second.\n \t\n\n"
    assert response[paragraphs[2].start : paragraphs[2].end] == "Third.\n\n"


def test_final_paragraph_holds_the_last_answer_marker() -> None:
    response = "Answer: real is what a human might say.\n\n### Answer: fake\n\nThanks for asking."
    paragraphs = split_paragraphs(response)
    assert [p.is_final for p in paragraphs] == [False, True, False]
    no_marker = split_paragraphs("One.\n\nTwo.")
    assert [p.is_final for p in no_marker] == [False, True]


def test_blank_response_is_one_empty_final_paragraph() -> None:
    assert split_paragraphs("") == [Paragraph("", 0, 0, True)]
    assert split_paragraphs(" \n\n ") == [Paragraph("", 0, 4, True)]


# ------------------------------------------------------------------ offsets -> paragraphs


def test_token_ids_from_offsets_follow_the_rules() -> None:
    text = "Ab cd.\n\nEf gh.\n\nAnswer: fake"
    paragraphs = split_paragraphs(text)  # starts 0, 8, 16
    offsets = [(0, 0), (0, 2), (2, 5), (5, 6), (6, 8), (0, 0), (8, 10), (10, 14), (14, 16),
               (16, 22), (22, 27), (0, 0)]
    ids = token_paragraph_ids(paragraphs, offsets, n_tokens=len(offsets) + 2)
    # leading special -> first; "\n\n" -> before; mid special -> previous token's; EOS/pad -> last
    assert ids == [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]


def test_token_straddling_the_separator_goes_with_its_word() -> None:
    text = "One.\n\nTwo."
    paragraphs = split_paragraphs(text)  # "One.\n\n" then "Two."
    offsets = [(0, 4), (4, 5), (5, 9), (9, 10)]  # "One." "\n" "\nTwo" "."
    assert token_paragraph_ids(paragraphs, offsets, 4) == [0, 0, 0, 1]  # by first character
    assert token_paragraph_ids(paragraphs, offsets, 4, text) == [0, 0, 1, 1]  # by first visible


def test_more_offsets_than_tokens_is_an_error() -> None:
    with pytest.raises(ValueError):
        token_paragraph_ids(split_paragraphs("a"), [(0, 1), (0, 0)], n_tokens=1)


# ------------------------------------------------------------------ generated ids -> paragraphs


def _assert_exact_cover(tokenizer: PreTrainedTokenizerFast, response: str, *, exact_text: bool) -> None:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id]
    paragraphs, para_ids = map_tokens(tokenizer, ids)
    text = decode_response(tokenizer, ids)

    assert len(para_ids) == len(ids)  # every generated token has exactly one paragraph
    assert all(0 <= j < len(paragraphs) for j in para_ids)
    assert para_ids == sorted(para_ids)  # paragraphs are contiguous runs of tokens
    assert para_ids[-3:] == [len(paragraphs) - 1] * 3  # EOS and padding go to the last
    assert set(para_ids) == set(range(len(paragraphs)))  # every paragraph owns tokens
    assert paragraphs == split_paragraphs(text)
    if exact_text:
        # the tokens given to a paragraph decode to exactly that paragraph's text
        for j, paragraph in enumerate(paragraphs):
            own = [t for t, owner in zip(ids, para_ids) if owner == j]
            assert decode_response(tokenizer, own).strip() == paragraph.text


@pytest.mark.parametrize("response", RESPONSES)
def test_byte_level_tokens_cover_paragraphs_exactly(byte_level_tokenizer, response: str) -> None:
    ids = byte_level_tokenizer(response, add_special_tokens=False)["input_ids"]
    assert byte_level_tokenizer.decode(ids) == response  # byte-level round trip
    _assert_exact_cover(byte_level_tokenizer, response, exact_text=True)


@pytest.mark.parametrize("response", RESPONSES)
def test_llama_style_tokens_cover_every_token_once(llama_style_tokenizer, response: str) -> None:
    _assert_exact_cover(llama_style_tokenizer, response, exact_text=False)


def test_char_spans_are_exact_for_partial_utf8_tokens(byte_level_tokenizer) -> None:
    response = "日本 😀 x"
    ids = byte_level_tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(response)  # some tokens hold only part of a character
    text, spans = token_char_spans(byte_level_tokenizer, ids)
    assert text == response
    # spans never go backwards, start at 0 and end at the end of the text
    assert spans[0][0] == 0 and max(e for _, e in spans) == len(text)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s1 >= s0 and e1 >= e0 and s1 <= e0
    # every token's span is non-empty: partial bytes point at the character they build
    assert all(e > s for s, e in spans)
    # the emoji's bytes (several tokens) all point at the emoji
    emoji = response.index("😀")
    holders = [i for i, (s, e) in enumerate(spans) if s <= emoji < e]
    assert len(holders) >= 2


def test_leading_space_token_after_blank_line_goes_to_its_paragraph(byte_level_tokenizer) -> None:
    response = "Skin texture.\n\n Lighting is natural."
    ids = byte_level_tokenizer(response, add_special_tokens=False)["input_ids"]
    paragraphs, para_ids = map_tokens(byte_level_tokenizer, ids)
    second = [t for t, j in zip(ids, para_ids) if j == 1]
    assert decode_response(byte_level_tokenizer, second) == " Lighting is natural."
    assert paragraphs[1].text == "Lighting is natural."


def _spans_by_definition(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> list[tuple[int, int]]:
    """Token i ends where decode(ids[:i+1]) stops agreeing with decode(ids); a token holding
    only part of a character points at that character."""
    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    text, spans, done = decode(ids), [], 0
    for i in range(len(ids)):
        prefix = decode(ids[: i + 1])
        common = len(os.path.commonprefix([prefix, text]))
        if common <= done and len(prefix) > common and done < len(text):
            spans.append((done, done + 1))
            continue
        spans.append((done, max(common, done)))
        done = max(common, done)
    return spans


MULTIBYTE = "Emoji 😀👍🏽 and café 日本 text.\n\n😀 starts this 日本語 paragraph.\n\n### Answer: fake"


@pytest.mark.parametrize("which", ["byte_level_tokenizer", "llama_style_tokenizer"])
def test_spans_match_the_definition_for_every_truncation(request, which: str) -> None:
    """Linear-time windowed spans equal prefix decoding, also when generation stops mid-character."""
    tokenizer = request.getfixturevalue(which)
    ids = tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"]
    for n in range(1, len(ids) + 1):
        cut = ids[:n] + [tokenizer.eos_token_id]
        text, spans = token_char_spans(tokenizer, cut)
        assert spans == _spans_by_definition(tokenizer, cut), n
        if not text.endswith("\ufffd"):  # the linear path, not the fallback, gave them
            assert paragraphs_module._windowed_spans(tokenizer, cut, text) == spans, n


def test_unverified_window_falls_back_to_prefix_decoding(llama_style_tokenizer, monkeypatch) -> None:
    # without context every metaspace token loses its leading space: the check must catch it
    monkeypatch.setattr(paragraphs_module, "_WINDOW", 0)
    ids = llama_style_tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"]
    text = decode_response(llama_style_tokenizer, ids)
    assert paragraphs_module._windowed_spans(llama_style_tokenizer, ids, text) is None
    assert token_char_spans(llama_style_tokenizer, ids)[1] == _spans_by_definition(llama_style_tokenizer, ids)


def test_a_special_token_inside_a_later_paragraph_stays_in_that_paragraph() -> None:
    text = "Ab cd.\n\nEf gh.\n\nAnswer: fake"
    paragraphs = split_paragraphs(text)  # starts 0, 8, 16
    offsets = [(0, 2), (2, 8), (8, 10), (0, 0), (10, 16), (16, 22), (0, 0), (22, 27)]
    ids = token_paragraph_ids(paragraphs, offsets, n_tokens=len(offsets))
    assert ids == [0, 0, 1, 1, 1, 2, 2, 2]  # each special token takes the previous token's paragraph
