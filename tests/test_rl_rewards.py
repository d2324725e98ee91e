"""Keywords, lexicon labels with negation, PCR, rewards, VCR with a tiny CLIP, `eval rewards`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dxcli.base.errors import DxError
from dxcli.rl.clip import ClipScorer
from dxcli.rl.explain import explain, rows_from_file, summarize
from dxcli.rl.paragraphs import Paragraph
from dxcli.rl.rewards import (
    keyword,
    load_lexicon,
    paragraph_label,
    paragraph_rewards,
    pcr,
    score_response,
)
from helpers_rl import tiny_hf_clip

VALID = ("**Skin**: no visible artifacts, natural pores.\n\n**Lighting**: inconsistent lighting.\n\n"
         "**Background**: authentic and consistent.\n\n### Answer: real")
INVALID = "**Skin**: overly smooth skin.\n\nI cannot decide."


@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon()


# ------------------------------------------------------------------ keywords


def test_final_paragraph_keyword_is_the_answer_word() -> None:
    final = Paragraph("**Conclusion**: skin is smooth. ### Answer: fake", 0, 10, True)
    assert keyword(final, "fake") == "fake"


def test_keyword_is_a_lowercased_yake_phrase_of_at_most_three_words() -> None:
    text = "**Skin Texture**: The Skin Texture shows overly smooth regions around the cheeks."
    phrase = keyword(Paragraph(text, 0, len(text), False), "fake")
    assert phrase and phrase == phrase.lower()
    assert 1 <= len(phrase.split()) <= 3
    assert phrase in text.lower()


def test_keyword_falls_back_to_the_first_three_words() -> None:
    text = "It is what it is."  # only stop words: YAKE finds nothing
    assert keyword(Paragraph(text, 0, len(text), False), None) == "it is what"


# ------------------------------------------------------------------ lexicon and labels


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("There are no visible artifacts.", "real"),
        ("The edges are rendered without any warping.", "real"),
        ("Inconsistent lighting on the left side.", "fake"),  # not "consistent"
        ("The skin looks unnatural.", "fake"),  # not "natural"
        ("The texture looks unrealistic.", "fake"),  # not "realistic"
        ("no artifacts; natural pores", "real"),  # "no" negates artifacts, not natural
        ("Natural skin, but no pores at all", None),  # natural (real) vs "no pores" (fake): tie
        ("This does not look authentic.", "fake"),
        ("It isn\u2019t natural.", "fake"),
        ("The face lacks natural pores", "fake"),
        ("There is an absence of any visible artifacts", "real"),  # "absence of" = one word
        ("Strong artifacts around the eyes", "fake"),
        ("Several artifacts", "fake"),  # plural of "artifact"
        ("Overly-smooth skin", "fake"),  # hyphen between the words of a term
        ("It could be real or fake.", None),  # a tie
        ("The photo shows a dog.", None),  # no evidence
        ("Not here. Artifacts everywhere.", "fake"),  # negation stops at the clause end
        ("no, artifacts everywhere", "fake"),  # ... and at a comma
        ("no sign of any blurry edges", "real"),  # "no" is four words before the term: the window's reach
        ("Realistic texture", "real"),  # counted once: longest term wins
    ],
)
def test_paragraph_label(lexicon, text: str, label: str | None) -> None:
    assert paragraph_label(text, lexicon) == label


def test_evidence_counts_each_overlapping_term_once(lexicon) -> None:
    evidence = lexicon.evidence("Realistic texture and inconsistent lighting")
    assert [(m, cls) for m, cls, _ in evidence] == [("realistic texture", "real"),
                                                     ("inconsistent lighting", "fake")]


def test_custom_lexicon_file_and_window(tmp_path: Path) -> None:
    path = tmp_path / "lex.yaml"
    path.write_text("negation_window: 4\nnegators: [\"no\"]\nfake: [blob]\nreal: [sharp]\n")
    lex = load_lexicon(path)
    assert paragraph_label("no sign of any blob", lex) == "real"  # window 4 reaches "no"
    assert paragraph_label("sharp", lex) == "real"
    assert paragraph_label("blobs", lex) == "fake"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("fake: [a\n", "malformed YAML"),
        ("- just a list\n", "expected a mapping"),
        ("negators: [\"no\"]\nfake: [x]\nreal: [y]\nnegatoin_window: 3\n",
         "did you mean 'negation_window'"),
        ("negators: [\"no\"]\nfake: [x]\nreal: []\n", "'real' must be a non-empty list"),
        ("negators: [\"no\"]\nfake: [x, 3]\nreal: [y]\n", "terms must be non-empty strings"),
        ("negators: [no]\nfake: [x]\nreal: [y]\n", "quote it"),  # YAML reads a bare no as false
        ("negators: [\"no\"]\nfake: [smooth skin]\nreal: [smooth  skin]\n", "both real and fake"),
        ("negators: [\"no\"]\nfake: [x]\nreal: [y]\nnegation_window: 0\n", "positive integer"),
        ("negators: [\"no\"]\nfake: [x]\nreal: [y]\nnegation_unit: lines\n",
         "'negation_unit' must be words or chars, got 'lines'"),
        ("negators: [\"no\"]\nfake: [x]\nreal: [y]\nsection_titles: maybe\n",
         "'section_titles' must be true or false, got 'maybe'"),
        ("negators: [\"no\"]\nfake: [x]\nreal: [y]\nverdict_words: 3\n",
         "'verdict_words' must be true or false, got 3"),
        ("negators: [\"no\"]\nfake: [x]\nreal: [y]\nverdict_word: true\n", "did you mean 'verdict_words'"),
    ],
)
def test_malformed_lexicon_is_a_user_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "lex.yaml"
    path.write_text(content)
    with pytest.raises(DxError, match=message):
        load_lexicon(path)


def test_missing_lexicon_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DxError, match="no such lexicon"):
        load_lexicon(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ PCR and rewards


def test_pcr_final_paragraph_agrees_with_majority_of_earlier_labels() -> None:
    assert pcr(["real", "fake", "real", None], "real") == [1.0, 1.0, 1.0, 1.0]
    assert pcr(["real", "fake", "real", None], "fake") == [1.0, 1.0, 1.0, 0.0]
    # the final paragraph's own label does not vote
    assert pcr(["fake", "real", "real"], "fake") == [1.0, 1.0, 0.0]


def test_pcr_tie_or_no_votes_gives_zero_and_no_answer_zeroes_everything() -> None:
    assert pcr(["real", "fake", None], "real") == [1.0, 1.0, 0.0]
    assert pcr([None, None, None], "fake") == [1.0, 1.0, 0.0]
    assert pcr(["real", "real", None], None) == [0.0, 0.0, 0.0]


def test_pcr_with_a_final_paragraph_before_the_end() -> None:
    # paragraphs after the final one: PCR 1, and they do not vote
    assert pcr(["fake", None, "real", "real"], "fake", final_index=1) == [1.0, 1.0, 1.0, 1.0]


def test_score_response_and_rewards_by_hand(lexicon) -> None:
    score = score_response(VALID, lexicon=lexicon)
    assert score.answer == "real"
    assert score.labels[:3] == ["real", "fake", "real"]
    assert score.keywords[-1] == "real"
    assert score.pcr == [1.0, 1.0, 1.0, 1.0]
    vcr = [0.2, 0.4, 0.6, 0.8]
    rewards = paragraph_rewards([score], [vcr], a=0.5, b=0.5)
    assert rewards[0] == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert paragraph_rewards([score], None, a=0.5, b=0.5)[0] == [0.5] * 4  # VCR dropped


def test_invalid_response_gets_zero_on_every_paragraph(lexicon) -> None:
    score = score_response(INVALID, lexicon=lexicon)
    assert score.answer is None and len(score.paragraphs) == 2
    assert paragraph_rewards([score], [[0.9, 0.9]])[0] == [0.0, 0.0]
    assert paragraph_rewards([score], None)[0] == [0.0, 0.0]


def test_answer_override_replaces_the_parsed_answer(lexicon) -> None:
    score = score_response(VALID, lexicon=lexicon, answer_override="fake")
    assert score.answer == "fake" and score.pcr[-1] == 0.0 and score.keywords[-1] == "fake"


# ------------------------------------------------------------------ VCR with a tiny CLIP


@pytest.fixture(scope="module")
def tiny_clip() -> ClipScorer:
    """A random CLIPModel from config with a byte-level BPE trained on the spot (no downloads)."""
    return ClipScorer(*tiny_hf_clip())


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 48), (200, 30, 30)), Image.linear_gradient("L").resize((36, 36))]


def test_vcr_is_cosine_mapped_to_unit_interval_in_one_text_pass(tiny_clip: ClipScorer) -> None:
    long_phrase = "a keyword phrase far longer than sixteen tokens " * 3  # truncated, still scored
    keywords = ["skin texture", "natural lighting", "fake", long_phrase]
    calls = []
    hook = tiny_clip.model.text_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        image_emb = tiny_clip.image_embeddings(_images()[:1])
        values = tiny_clip.vcr(image_emb[0], keywords)
    finally:
        hook.remove()
    assert len(calls) == 1  # all keywords in one batched text forward
    assert values.shape == (len(keywords),)
    assert bool(((values >= 0) & (values <= 1)).all())
    # independent check through CLIP's own forward: logits = exp(logit_scale) * cosine
    batch = tiny_clip.tokenizer(keywords, padding=True, truncation=True, max_length=16,
                                return_tensors="pt")
    pixels = tiny_clip.image_processor(images=_images()[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = tiny_clip.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=pixels)
    cosine = out.logits_per_image[0] / tiny_clip.model.logit_scale.exp()
    assert torch.allclose(values, (cosine + 1) / 2, atol=1e-5)


def test_group_vcr_batches_a_whole_step_in_one_text_pass(tiny_clip: ClipScorer, lexicon) -> None:
    groups = [[score_response(VALID, lexicon=lexicon), score_response(INVALID, lexicon=lexicon)],
              [score_response(VALID, lexicon=lexicon)]]
    calls = []
    hook = tiny_clip.model.text_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        image_embs = tiny_clip.image_embeddings(_images())
        values = tiny_clip.group_vcr(image_embs, groups)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert [[len(v) for v in per_image] for per_image in values] == [[4, 2], [4]]
    # the same response against the same keywords differs only through the image
    single = tiny_clip.vcr(image_embs[1], groups[1][0].keywords).tolist()
    assert values[1][0] == pytest.approx(single, abs=1e-6)
    assert values[0][0] != pytest.approx(values[1][0], abs=1e-6)


def test_clip_scorer_loads_from_a_local_folder(tiny_clip: ClipScorer, tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    tiny_clip.model.save_pretrained(folder)
    tiny_clip.tokenizer.save_pretrained(folder)
    tiny_clip.image_processor.save_pretrained(folder)
    loaded = ClipScorer.load(folder)
    image = _images()[:1]
    expected = tiny_clip.vcr(tiny_clip.image_embeddings(image), ["skin texture", "fake"])
    got = loaded.vcr(loaded.image_embeddings(image), ["skin texture", "fake"])
    assert torch.allclose(expected, got, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.model.parameters())  # frozen


def test_clip_scorer_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DxError, match="no such CLIP"):
        ClipScorer.load(tmp_path / "missing")


# ------------------------------------------------------------------ dx eval rewards


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_from_rollouts_and_from_grouped_eval_answers(tmp_path: Path) -> None:
    rollouts = _write_jsonl(tmp_path / "r.jsonl", [{"image": "a.png", "responses": [VALID, INVALID]},
                                                   {"image": None, "responses": [VALID]}])
    assert rows_from_file(rollouts) == [{"image": "a.png", "responses": [VALID, INVALID]},
                                        {"image": None, "responses": [VALID]}]
    answers = _write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "q1", "image": "a.png", "text": VALID, "predict": "real"},
        {"question_id": "q2", "image": "b.png", "text": INVALID, "predict": None},
        {"question_id": "q1", "image": "a.png", "text": INVALID, "predict": None},
    ])
    assert rows_from_file(answers) == [{"image": "a.png", "responses": [VALID, INVALID]},
                                       {"image": "b.png", "responses": [INVALID]}]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"image": "a.png", "responses": ["x"]}, {"question_id": 1, "text": "y"}], "mixes"),
        ([{"image": "a.png"}], "neither"),
        ([{"image": "a.png", "responses": "x"}], "list of strings"),
        ([{"image": 3, "responses": ["x"]}], "'image' must be"),
        ([{"question_id": 1, "text": None}], "'text' must be a string"),
    ],
)
def test_bad_reward_input_is_a_user_error(tmp_path: Path, rows: list[dict], message: str) -> None:
    with pytest.raises(DxError, match=message):
        rows_from_file(_write_jsonl(tmp_path / "x.jsonl", rows))


def test_explain_without_clip_and_summary(lexicon) -> None:
    explained = explain([{"image": "a.png", "responses": [VALID, INVALID]}], images_root=None, clip=None,
                        lexicon=lexicon)
    assert list(explained[0]) == ["image", "responses"]
    valid, invalid = explained[0]["responses"]
    assert list(valid) == ["answer", "paragraphs"]
    assert valid["answer"] == "real" and invalid["answer"] is None
    keys = ["text", "start", "end", "keyword", "label", "vcr", "pcr", "reward", "advantage"]
    assert all(list(p) == keys and p["vcr"] is None for p in valid["paragraphs"] + invalid["paragraphs"])
    assert [p["reward"] for p in valid["paragraphs"]] == [0.5] * 4
    assert [p["reward"] for p in invalid["paragraphs"]] == [0.0, 0.0]
    # 4 paragraphs at 0.5, 2 at 0: mean 1/3, population std sqrt(1/18) = sqrt(2)/6
    std = math.sqrt(2) / 6
    assert valid["paragraphs"][0]["advantage"] == pytest.approx((0.5 - 1 / 3) / (std + 1e-4))
    assert invalid["paragraphs"][0]["advantage"] == pytest.approx((0 - 1 / 3) / (std + 1e-4))
    json.dumps(explained)  # plain JSON types only

    summary = summarize(explained)
    assert summary["responses"] == 2 and summary["paragraphs"] == 6
    assert summary["mean_vcr"] is None
    assert summary["mean_pcr"] == pytest.approx(4 / 6)
    assert summary["consistency_rate"] == 1.0
    assert summary["paragraphs_per_response"] == 3.0
    assert summary["invalid_rate"] == 0.5


def test_explain_with_clip_reads_the_image_under_the_root(tiny_clip: ClipScorer, tmp_path: Path,
                                                          lexicon) -> None:
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    _images()[0].save(tmp_path / "imgs" / "sub" / "a.png")
    rows = [{"image": "sub/a.png", "responses": [VALID, INVALID]}, {"image": None, "responses": [VALID]}]
    explained = explain(rows, images_root=tmp_path / "imgs", clip=tiny_clip, lexicon=lexicon)
    with_image = [p for r in explained[0]["responses"] for p in r["paragraphs"]]
    assert all(0.0 <= p["vcr"] <= 1.0 for p in with_image)
    first = explained[0]["responses"][0]["paragraphs"][0]
    assert first["reward"] == pytest.approx(0.5 * first["vcr"] + 0.5 * first["pcr"])
    assert all(p["vcr"] is None for p in explained[1]["responses"][0]["paragraphs"])
    summary = summarize(explained)
    assert summary["mean_vcr"] == pytest.approx(sum(p["vcr"] for p in with_image) / len(with_image))

    with pytest.raises(DxError, match="escapes"):
        explain([{"image": "../outside.png", "responses": [VALID]}], images_root=tmp_path / "imgs",
                clip=tiny_clip, lexicon=lexicon)
    with pytest.raises(DxError, match="not found"):
        explain([{"image": "sub/missing.png", "responses": [VALID]}], images_root=tmp_path / "imgs",
                clip=tiny_clip, lexicon=lexicon)
