"""The one answer parser (METHOD.md §3): last marker wins, never guessed from other words."""

import pytest

from dxcli.base.answer import answer_span, label_to_int, parse_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("**Lighting**: flat.\n\n### Answer: fake", "fake"),
        ("### Answer: real", "real"),
        # the last marker wins, whatever came before
        ("Answer: real at first glance... on reflection\n### Answer: fake", "fake"),
        ("Answer: fake\nAnswer: real", "real"),
        # case of the marker and of the word
        ("### ANSWER: FAKE", "fake"),
        ("answer: Real", "real"),
        # punctuation after the word
        ("### Answer: Fake.", "fake"),
        ("Answer: real!", "real"),
        ("Answer: fake, clearly", "fake"),
        # markdown around the marker and around the word
        ("**Answer**: fake", "fake"),
        ("__Answer__: real", "real"),
        ("Answer: **real**", "real"),
        ("Answer: `fake`", "fake"),
        ("Answer: 'real'", "real"),
        ('Answer: "fake"', "fake"),
        ("### **Answer:** real", "real"),
        # fullwidth colon and spaces around the colon
        ("Answer\uff1a fake", "fake"),
        ("Answer :  real", "real"),
    ],
)
def test_marker_gives_the_verdict(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "The skin texture looks fake to me.",  # no marker: never guessed
        "This is not real.",
        "this is real",
        "Answer: realistic lighting everywhere",  # \b: 'realistic' is not 'real'
        "Answer: fakery",
        "Answer: unsure, maybe real",  # the word must follow the marker directly
        "My answer is fake",  # no colon, no marker
    ],
)
def test_no_marker_gives_none(text):
    assert parse_answer(text) is None


def test_answer_span_points_at_last_marker():
    text = "Answer: real\n\n### Answer: fake."
    start, end = answer_span(text)
    assert text[start:end].lower() == "answer: fake"
    assert answer_span("no verdict here") is None


def test_fake_is_the_positive_class():
    assert (label_to_int("fake"), label_to_int("real")) == (1, 0)


def test_head_verdict_counts_a_tie_at_the_threshold_as_fake():
    from dxcli.base.answer import HEAD_THRESHOLD, head_verdict

    assert head_verdict(HEAD_THRESHOLD) == "fake"
    assert head_verdict(HEAD_THRESHOLD - 1e-6) == "real"
    assert head_verdict(1.0) == "fake" and head_verdict(0.0) == "real"
