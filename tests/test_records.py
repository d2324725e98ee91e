"""Conversation records: loading (original train.json too), path safety, reasoning, the tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dxcli.data.records import (Record, default_reasoning, load_reasoning, load_records,
                                records_from_tree, save_records)
from dxcli.base.errors import DxError
from dxcli.base.template import DEFAULT_QUESTION
from helpers_images import make_tree

ORIGINAL_QUESTION = ("<image>\nAnalyze this image for any signs of digital manipulation or artificial "
                     "generation and determine if it is real or fake.")


def turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_original_train_json_loads_and_labels_are_derived(tmp_path: Path):
    original = [
        {"id": "ddim/train/fake/a.png", "image": "ddim/train/fake/a.png",
         "conversations": turn(ORIGINAL_QUESTION, "**Skin**: unnatural.\n\n### Answer: fake"),
         "binary_label": 1},
        {"id": "r1", "image": "ddim/train/real/b.png",  # no binary_label: from the label folder
         "conversations": turn(ORIGINAL_QUESTION, "**Skin**: pores.\n\n### Answer: real")},
        {"image": "loose/c.png",  # no label folder, no binary_label: from the answer marker
         "conversations": turn(ORIGINAL_QUESTION, "Looks synthetic. **Answer**: Fake.")},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(original, indent=2))
    a, b, c = load_records(path)
    assert (a.binary_label, a.domain, a.label) == (1, "ddim", "fake")
    assert (b.id, b.binary_label, b.domain) == ("r1", 0, "ddim")
    assert (c.id, c.binary_label, c.domain) == ("loose/c.png", 1, None)
    assert a.question.startswith("Analyze") and "<image>" not in a.question


def test_to_json_is_the_spec_llava_format_and_round_trips(tmp_path: Path):
    record = Record("x", "sd/test/real/x.png", DEFAULT_QUESTION, "ok\n\n### Answer: real", 0, "sd")
    data = record.to_json()
    assert list(data) == ["id", "image", "domain", "conversations", "binary_label"]
    assert data["conversations"][0] == {"from": "human", "value": "<image>\n" + DEFAULT_QUESTION}
    assert data["conversations"][1] == {"from": "gpt", "value": "ok\n\n### Answer: real"}
    save_records(tmp_path / "r.json", [record, record])
    assert load_records(tmp_path / "r.json") == [record, record]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(record.to_json()) for _ in range(2)))
    assert load_records(tmp_path / "r.jsonl") == [record, record]


def test_escaping_image_paths_name_the_record(tmp_path: Path):
    good = {"id": "ok", "image": "d/train/real/a.png", "conversations": turn("q", "### Answer: real")}
    for image in ("../outside.png", "d/../../outside.png", "/etc/passwd"):
        bad = dict(good, id="evil", image=image)
        path = tmp_path / "r.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(DxError, match=r"r\.jsonl:3 \(id 'evil'\)"):
            load_records(path)
    root = tmp_path / "images"
    (root / "d").mkdir(parents=True)
    (root / "d/out").symlink_to(tmp_path)  # escapes through a symlink: only seen with the root
    linked = dict(good, id="linked", image="d/out/a.png")
    (tmp_path / "s.json").write_text(json.dumps([good, linked]))
    assert len(load_records(tmp_path / "s.json")) == 2
    with pytest.raises(DxError, match=r"record 2 \(id 'linked'\)"):
        load_records(tmp_path / "s.json", images_root=root)


def test_malformed_lines_name_file_and_line(tmp_path: Path):
    good = json.dumps({"image": "a.png", "conversations": turn("q", "### Answer: real")})
    path = tmp_path / "broken.jsonl"
    path.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DxError, match=r"broken\.jsonl:3"):
        load_records(path)
    no_answer = {"image": "b.png", "conversations": [{"from": "human", "value": "q"}]}
    path.write_text(f"{good}\n{json.dumps(no_answer)}\n")
    with pytest.raises(DxError, match=r"broken\.jsonl:2 .*gpt"):
        load_records(path)
    path.write_text(json.dumps({"image": "b.png", "conversations": turn("q", "a"), "binary_label": 3}))
    with pytest.raises(DxError, match="binary_label"):
        load_records(path)


def test_records_from_tree_answers_and_filters(tmp_path: Path):
    root = tmp_path / "tree"
    make_tree(root, n=1, domains=("a", "b"))
    reasoning = {"a/val/fake/fake_0.png": "**Edges**: warping around the ear."}
    records = records_from_tree(root, splits=("val",), domains=["a"], reasoning=reasoning)
    answers = {r.image: r.answer for r in records}
    assert answers == {"a/val/fake/fake_0.png": "**Edges**: warping around the ear.\n\n### Answer: fake",
                       "a/val/real/real_0.png": "### Answer: real"}
    assert {r.question for r in records} == {DEFAULT_QUESTION}
    assert len(records_from_tree(root, splits=("train", "test"))) == 8
    with pytest.raises(DxError, match="zzz"):
        records_from_tree(root, domains=["zzz"])


def test_load_reasoning_from_jsonl_and_original_records(tmp_path: Path):
    root = tmp_path / "tree"
    make_tree(root, n=1, domains=("sd",), splits=("train",))
    assert default_reasoning(root) is None
    (root / "reasoning.jsonl").write_text(
        json.dumps({"image": "sd/train/real/real_0.png", "reasoning": "natural.\n\n### Answer: real"}) + "\n")
    assert default_reasoning(root) == {"sd/train/real/real_0.png": "natural.\n\n### Answer: real"}
    original = [{"image": "DF_R5/sd/train/fake/fake_0.png",  # prefixed path still matches
                 "conversations": turn(ORIGINAL_QUESTION, "smooth.\n\n### Answer: fake")}]
    (tmp_path / "train.json").write_text(json.dumps(original))
    reasoning = load_reasoning(tmp_path / "train.json")
    records = {r.image: r.answer for r in records_from_tree(root, reasoning=reasoning)}
    assert records["sd/train/fake/fake_0.png"] == "smooth.\n\n### Answer: fake"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(DxError, match="item 1"):
        load_reasoning(tmp_path / "bad.jsonl")
