"""eval robust: perturbed copies (PIL), one table row per perturbation, originals untouched, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dxcli.base.errors import UsageError
from dxcli.base.images import load_rgb
from dxcli.cli.main import app
from dxcli.evaluation import robust

runner = CliRunner()


@pytest.fixture(scope="module")
def questions(tmp_path_factory, demo_root) -> Path:
    from dxcli.base.jsonio import write_jsonl_atomic
    from dxcli.data.questions import generate_questions

    rows, _ = generate_questions(demo_root, n=12, seed=0, balanced=True, split="test")
    path = tmp_path_factory.mktemp("robust-q") / "questions.jsonl"
    write_jsonl_atomic(path, rows)
    return path


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_perturbation_changes_pixels_and_repeats_exactly(demo_root):
    image = load_rgb(sorted(demo_root.glob("*/test/fake/*.png"))[0])
    original = np.asarray(image, dtype=np.int16)
    for name in robust.PERTURBATIONS:
        first, again = robust.perturb(image, name, "a.png"), robust.perturb(image, name, "a.png")
        assert first.size == image.size and first.mode == "RGB"
        assert np.abs(np.asarray(first, dtype=np.int16) - original).max() > 0, name
        assert np.array_equal(np.asarray(first), np.asarray(again)), name  # a rerun makes the same copy


def test_perturbation_list_is_checked():
    assert robust.parse_perturbations("jpeg50, blur,jpeg50") == ["jpeg50", "blur"]
    assert robust.parse_perturbations(None) == list(robust.PERTURBATIONS)
    with pytest.raises(UsageError, match="did you mean 'jpeg50'"):
        robust.parse_perturbations("jpg50")


def test_work_folder_inside_the_image_root_is_refused(trained, demo_root, questions):
    result = runner.invoke(app, ["eval", "robust", "--model", str(trained["instruct"]), "--questions",
                                 str(questions), "--images", str(demo_root), "--work", str(demo_root / "robust")])
    assert result.exit_code == 2 and "beside the originals" in result.output
    assert not (demo_root / "robust").exists()


def read_answers(path: Path) -> dict[str, dict]:
    return {r["question_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_robust_table_changes_and_resume(trained, demo_root, questions, tmp_path, monkeypatch):
    import dxcli.evaluation.infer as infer_module

    before = tree_digest(demo_root)
    calls = {"generate": 0}
    real_generate = infer_module.generate

    def counting_generate(*args, **kwargs):
        calls["generate"] += 1
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(infer_module, "generate", counting_generate)
    work = tmp_path / "work"
    args = ["eval", "robust", "--model", str(trained["instruct"]), "--questions", str(questions), "--images",
            str(demo_root), "--work", str(work), "--max-new-tokens", "24", "--batch-size", "12"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    names = ["clean", *robust.PERTURBATIONS]
    f1_table, auc_table = first.stdout.split("F1 %", 1)[1].split("head AUC %", 1)
    for block in (f1_table, auc_table):  # one row per perturbation in each table
        assert [line.split()[0] for line in block.splitlines() if line.split() and line.split()[0] in names] == names
    assert calls["generate"] == len(names)  # one batch of 12 per set of images
    clean = read_answers(work / "clean" / "answers.jsonl")
    for name in ("jpeg50", "blur"):
        moved = read_answers(work / name / "answers.jsonl")
        assert moved.keys() == clean.keys()
        assert any(moved[q]["head_prob"] != clean[q]["head_prob"] for q in clean), name
        assert all(not moved[q]["image"].startswith("..") and "error" not in moved[q] for q in moved)
    sample = next(iter(clean.values()))["image"]
    for name in names[1:]:  # the copies inference saw differ from the original
        copy = np.asarray(load_rgb(work / name / "images" / robust.copy_name(sample)), dtype=np.int16)
        assert np.abs(copy - np.asarray(load_rgb(demo_root / sample), dtype=np.int16)).max() > 0, name
    assert tree_digest(demo_root) == before  # originals untouched, nothing written beside them

    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert calls["generate"] == len(names)  # resumed: no inference at all
    scores = json.loads(again.stdout.strip().splitlines()[-1])["scores"]
    assert list(scores) == names and scores["clean"]["overall"]["n"] == 12
