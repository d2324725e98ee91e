"""dx questions gen: seeded, byte-stable question sets; balance; label cross-checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dxcli.cli.main import app
from dxcli.data.questions import generate_questions
from dxcli.base.errors import DxError, UsageError
from helpers_images import exit_status, make_tree

runner = CliRunner()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    make_tree(root, n=6, domains=("a", "b"), splits=("val", "test"), size=(8, 8))
    for i in range(6, 10):  # more fake than real in a/test, so --balanced has work to do
        (root / f"a/test/fake/fake_{i}.png").write_bytes((root / "a/test/fake/fake_0.png").read_bytes())
    return root


def gen(args: list[str]):
    return runner.invoke(app, ["questions", "gen", *args])


def test_same_seed_gives_byte_identical_files(tree: Path, tmp_path: Path):
    for name, seed in (("one", "7"), ("two", "7"), ("three", "8")):
        assert exit_status(gen([str(tree), "--out", str(tmp_path / name), "--n", "9",
                                "--seed", seed])) == 0
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()
    assert (tmp_path / "one").read_bytes() != (tmp_path / "three").read_bytes()


def test_questions_follow_the_spec_format(tree: Path):
    questions, mismatches = generate_questions(tree, n=None, seed=0, balanced=False)
    assert len(questions) == 28 and mismatches == []
    first = questions[0]
    assert set(first) == {"question_id", "image", "text", "label", "domain"}
    assert all(q["question_id"] == q["image"] and "/test/" in q["image"] for q in questions)
    for q in questions:
        assert q["label"] == q["image"].split("/")[2] and q["domain"] == q["image"].split("/")[0]
    ids_seed1 = {q["question_id"] for q in generate_questions(tree, n=10, seed=1, balanced=False)[0]}
    assert ids_seed1 <= {q["question_id"] for q in questions} and len(ids_seed1) == 10


def test_balanced_gives_equal_real_and_fake(tree: Path):
    questions, _ = generate_questions(tree, n=None, seed=0, balanced=True, domain="a")
    assert Counter(q["label"] for q in questions) == {"real": 6, "fake": 6}
    questions, _ = generate_questions(tree, n=8, seed=0, balanced=True)
    assert Counter(q["label"] for q in questions) == {"real": 4, "fake": 4}
    val, _ = generate_questions(tree, n=None, seed=0, balanced=False, split="val", domain="b")
    assert {q["image"].rsplit("/", 2)[0] for q in val} == {"b/val"} and len(val) == 12


def test_records_are_cross_checked_against_the_answer(tmp_path: Path):
    def record(image, answer, **extra):
        return {"image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                  {"from": "gpt", "value": answer}], **extra}

    path = tmp_path / "records.jsonl"
    rows = [record("d/test/fake/1.png", "smooth.\n\n### Answer: fake"),
            record("d/test/fake/2.png", "natural.\n\n### Answer: real"),   # folder says fake
            record("d/test/real/3.png", "no conclusion here"),              # no marker
            record("d/test/real/4.png", "### Answer: real", binary_label=1),
            record("d/train/real/5.png", "### Answer: real")]               # other split
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions, mismatches = generate_questions(path, n=None, seed=0, balanced=False)
    assert [q["label"] for q in questions] == ["fake", "fake", "real", "real"]
    assert len(mismatches) == 3
    assert any("d/test/fake/2.png" in m and "says real" in m for m in mismatches)
    assert any("d/test/real/3.png" in m and "no marker" in m for m in mismatches)
    assert any("d/test/real/4.png" in m and "binary_label" in m for m in mismatches)
    result = gen([str(path), "--out", str(tmp_path / "q.jsonl"), "--json"])
    assert exit_status(result) == 0
    summary = json.loads(result.stdout)
    assert summary["questions"] == 4 and len(summary["mismatches"]) == 3
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 4


def test_errors(tree: Path, tmp_path: Path):
    with pytest.raises(UsageError):
        generate_questions(tree, n=0, seed=0, balanced=False)
    with pytest.raises(UsageError):
        generate_questions(tree, n=None, seed=0, balanced=False, split="Test")
    with pytest.raises(DxError, match="domain 'zzz'"):
        generate_questions(tree, n=None, seed=0, balanced=False, domain="zzz")
    assert exit_status(gen([str(tmp_path / "missing"), "--out", str(tmp_path / "q")])) == 2
    assert exit_status(gen([str(tree), "--out", str(tmp_path / "q"), "--split", "train"])) == 1


def test_asking_for_more_questions_than_exist_is_an_error(tmp_path):
    from dxcli.data.demo import make_demo
    from dxcli.data.questions import generate_questions

    root = tmp_path / "d"
    make_demo(root, seed=0, n_train=4, n_val=2, n_test=6)
    available = len(generate_questions(root, n=None, seed=0, balanced=False)[0])
    with pytest.raises(UsageError, match="--n"):
        generate_questions(root, n=available + 1, seed=0, balanced=False)
    with pytest.raises(UsageError, match="--balanced"):
        generate_questions(root, n=5000, seed=0, balanced=True)
