"""The switchable PCR rules (METHOD.md §9): negation unit and window, section titles, verdict
words, and the final paragraph's PCR on a tie or no votes; hand-labelled negation probes and the
ways a policy could game the reward."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dxcli import config
from dxcli.base.answer import parse_answer
from dxcli.base.errors import DxError
from dxcli.config import PrpoConfig
from dxcli.rl.advantages import prpo_token_advantages
from dxcli.rl.explain import explain
from dxcli.rl.rewards import (
    Lexicon,
    lexicon_from_dict,
    load_lexicon,
    paragraph_label,
    pcr,
    score_response,
    title_end,
)
from reward_probes import NEGATION_PROBES

# Probes the default rules (4 words of the clause, verdict words not evidence) label wrongly, and
# why. Strict: a probe that starts passing fails the test, so this list follows the default rules.
DEFAULT_MISSES = {
    "The image does not look fake.": "verdict words are not evidence (verdict_words: false)",
    "Neither the eyes nor the mouth show any distortion.": "'nor' is five words before the term",
    "The eyes are not symmetric and look deformed.": "'not' reaches 'deformed', four words on",
    "There's no way this skin texture is natural.": "'no' is six words before the term",
    "The face does not have the uncanny smoothness typical of generated images.":
        "'not' does not reach the second term",
    "The image is not only blurry but also shows warping around the jaw.":
        "'not only' flips 'blurry'",
    "Nothing about the lighting looks unnatural.": "'nothing' is not a negator",
    "The pores are not visible.": "the negation follows the term",
    "Artifacts are absent.": "'absent' is not a negator",
    "Far from being natural, the skin looks waxy.": "'far from' is not a negator",
    "It is hard to say whether the texture is natural or not.": "an undecided sentence has a term",
}


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return load_lexicon()


def with_rules(base: Lexicon, **rules: object) -> Lexicon:
    """The shipped terms under other matching rules (`replace` rebuilds the matcher)."""
    return dataclasses.replace(base, **rules)


# ------------------------------------------------------------------ defaults


def test_shipped_and_missing_keys_take_the_measured_rules(lexicon: Lexicon) -> None:
    # the values tests/bench/bench_reward_rules.py and the probes chose (METHOD.md §9)
    rules = ("negation_window", "negation_unit", "section_titles", "verdict_words")
    assert [getattr(lexicon, key) for key in rules] == [4, "words", False, False]
    bare = lexicon_from_dict({"negators": lexicon.negators, "fake": lexicon.fake, "real": lexicon.real})
    assert [getattr(bare, key) for key in rules] == [4, "words", False, False]


# ------------------------------------------------------------------ negation probes


def _probe_params() -> list:
    params = []
    for probe in NEGATION_PROBES:
        miss = DEFAULT_MISSES.get(probe.text)
        marks = [pytest.mark.xfail(strict=True, reason=miss)] if miss else []
        params.append(pytest.param(probe.text, probe.label, marks=marks, id=probe.text[:48]))
    return params


def test_probes_are_many_and_the_miss_list_names_probes() -> None:
    assert len(NEGATION_PROBES) >= 24
    assert set(DEFAULT_MISSES) <= {probe.text for probe in NEGATION_PROBES}


@pytest.mark.parametrize(("text", "label"), _probe_params())
def test_negation_probe_under_the_default_lexicon(lexicon: Lexicon, text: str, label: str | None) -> None:
    assert paragraph_label(text, lexicon) == label


def test_chars_unit_reaches_80_characters_across_a_comma(lexicon: Lexicon) -> None:
    chars = with_rules(lexicon, negation_unit="chars", negation_window=80)
    text = "No doubt about it, the skin looks natural."
    assert paragraph_label(text, lexicon) == "real"  # words: the comma stops "no"
    assert paragraph_label(text, chars) == "fake"  # chars: "no" is 34 characters before the term
    assert chars.evidence(text) == [("natural", "fake", True)]
    # exactly 80 characters back: "not" starts the window; one more and only "ot" is inside
    assert paragraph_label("not," + " " * 76 + "natural", chars) == "fake"
    assert paragraph_label("not," + " " * 77 + "natural", chars) == "real"
    assert paragraph_label("not," + " " * 30 + "natural", with_rules(chars, negation_window=30)) == "real"


def test_words_window_counts_words_of_the_clause(lexicon: Lexicon) -> None:
    text = "The texture does not appear to be natural."
    assert paragraph_label(text, with_rules(lexicon, negation_window=4)) == "fake"
    assert paragraph_label(text, with_rules(lexicon, negation_window=3)) == "real"


# ------------------------------------------------------------------ gaming: verdict words


def test_a_restated_verdict_is_no_evidence_without_verdict_words(lexicon: Lexicon) -> None:
    off, on = lexicon, with_rules(lexicon, verdict_words=True)  # off is the default
    for text in ("This image is fake.", "The image looks real.", "These are fakes.",
                 "This image is not real."):
        assert paragraph_label(text, off) is None, text
    assert paragraph_label("This image is fake.", on) == "fake"  # on: it votes
    # other terms still count, including those that contain a verdict word
    assert paragraph_label("The skin looks realistic.", off) == "real"
    assert paragraph_label("A deepfake of a face.", off) == "fake"
    assert paragraph_label("This image is fake: the skin is waxy.", off) == "fake"


def test_restating_the_verdict_earns_no_consistency_without_verdict_words(lexicon: Lexicon) -> None:
    response = "This image is fake.\n\nIt is clearly fake.\n\n### Answer: fake"
    off = score_response(response, lexicon=lexicon, keywords=False)  # the default
    assert off.labels[:2] == [None, None] and off.pcr == [1.0, 1.0, 0.0]
    on = score_response(response, lexicon=with_rules(lexicon, verdict_words=True), keywords=False)
    assert on.labels[:2] == ["fake", "fake"] and on.pcr == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------ gaming: section titles


def test_a_section_title_is_no_evidence_without_section_titles(lexicon: Lexicon) -> None:
    off, on = lexicon, with_rules(lexicon, section_titles=True)  # off is the default
    assert paragraph_label("**Artifacts**: none are visible.", off) is None
    assert paragraph_label("**Artifacts**: no visible artifacts.", off) == "real"
    assert paragraph_label("**Artifacts**: none are visible.", on) == "fake"
    assert paragraph_label("**Artifacts**: no visible artifacts.", on) is None  # a tie
    for text in ("## Artifacts\nThe skin is natural.", "###### Warping\nThe skin is natural.",
                 "Warping artifacts: the skin is natural.", "**Warping:** the skin is natural.",
                 "  __The halo check__: the skin is natural."):
        assert paragraph_label(text, off) == "real", text
        assert paragraph_label(text, on) != "real", text
    # a title leaves the terms after it as they are, with their own text
    assert [(m, cls) for m, cls, _ in off.evidence("**Artifacts**: waxy, no artifacts")] == [
        ("waxy", "fake"), ("artifacts", "real")]


def test_what_is_not_a_section_title(lexicon: Lexicon) -> None:
    off = with_rules(lexicon, section_titles=False)
    # five words before the colon, a title further in, and the answer marker line
    assert paragraph_label("The skin shows clear artifacts: around the eyes.", off) == "fake"
    assert paragraph_label("The skin is waxy. **Artifacts**: none.", off) == "fake"
    assert title_end("### answer: fake") == 0 and title_end("**answer: fake**") == 0
    final = "### Answer: fake"
    counted = with_rules(off, verdict_words=True)  # the marker line's verdict word is not cut as a title
    assert paragraph_label(final, counted) == "fake" and parse_answer(final) == "fake"
    assert score_response("Waxy skin.\n\n" + final, lexicon=off, keywords=False).pcr == [1.0, 1.0]


# ------------------------------------------------------------------ tie and no votes


def test_pcr_no_majority_sets_the_final_reward_on_a_tie_or_no_votes() -> None:
    assert pcr(["real", "fake", None], "real", no_majority=1.0) == [1.0, 1.0, 1.0]  # tie
    assert pcr([None, None, None], "fake", no_majority=1.0) == [1.0, 1.0, 1.0]  # no votes
    assert pcr([None, None], "fake", no_majority=0.5) == [1.0, 0.5]
    assert pcr(["fake", "fake", None], "real", no_majority=1.0) == [1.0, 1.0, 0.0]  # contrary
    assert pcr(["real", "real", None], "real", no_majority=0.0) == [1.0, 1.0, 1.0]
    assert pcr(["real", "fake", None], "real") == [1.0, 1.0, 0.0]  # default 0
    for labels in (["real", "fake", None], [None, None], ["real", None]):
        assert pcr(labels, None, no_majority=1.0) == [0.0] * len(labels)


class CharTokenizer:
    """One token per character: enough for the reward path, which only decodes."""

    def batch_decode(self, sequences: list[list[int]], **_: object) -> list[str]:
        return ["".join(map(chr, ids)) for ids in sequences]


def test_training_and_eval_rewards_pass_pcr_no_majority_through(lexicon: Lexicon) -> None:
    texts = ["The photo shows a dog.\n\n### Answer: real", "No artifacts.\n\n### Answer: real"]
    ids = [[ord(c) for c in text] for text in texts]
    final_pcr = []
    for value in (0.0, 1.0):
        _, stats = prpo_token_advantages(ids, CharTokenizer(), images=[None], G=2, clip=None,
                                         lexicon=lexicon, cfg=PrpoConfig(pcr_no_majority=value))
        final_pcr.append(stats[0]["final_pcr"])
    assert final_pcr == [0.5, 1.0]
    assert config.resolve("cpu-tiny", ["prpo.pcr_no_majority=1"]).config.prpo.pcr_no_majority == 1.0
    rows = [{"image": None, "responses": texts}]
    explained = explain(rows, images_root=None, clip=None, lexicon=lexicon, no_majority=1.0)
    assert [r["paragraphs"][-1]["pcr"] for r in explained[0]["responses"]] == [1.0, 1.0]


# ------------------------------------------------------------------ bad lexicon values


@pytest.mark.parametrize(("line", "key"), [("negation_unit: lines", "negation_unit"),
                                           ("section_titles: maybe", "section_titles"),
                                           ("verdict_words: 3", "verdict_words")])
def test_bad_rule_value_is_a_one_line_error_naming_file_and_key(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "lex.yaml"
    path.write_text(f"negators: [\"no\"]\nfake: [x]\nreal: [y]\n{line}\n")
    with pytest.raises(DxError) as caught:
        load_lexicon(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: '{key}' must be") and "\n" not in message
