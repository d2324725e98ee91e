"""dx dataset check: decoding, problem kinds, counts, the --json contract and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dxcli.cli.main import app
from dxcli.data.check import check_tree
from dxcli.base.images import safe_image_path
from dxcli.data.tree import scan_tree
from dxcli.base.errors import DxError, UsageError
from helpers_images import (exit_status, make_tree, png_declaring_size, save_image,
                            truncated_jpeg, write_odd_valid_images)

runner = CliRunner()


def kinds(report) -> dict[str, str]:
    return {p["path"]: p["kind"] for p in report.problems}


@pytest.fixture
def good_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    make_tree(root, n=2)
    (root / "reasoning.jsonl").write_text("{}\n")  # top-level files are not part of the tree
    (root / "README").write_text("notes")
    return root


def test_clean_tree_passes_with_counts(good_tree: Path):
    report = check_tree(good_tree, workers=1)
    assert report.ok and report.problems == []
    assert report.counts["alpha"]["train"] == {"real": 2, "fake": 2}
    assert set(report.counts) == {"alpha", "beta"}
    assert report.images == 24


def test_odd_valid_images_pass(tmp_path: Path):
    root = tmp_path / "tree"
    real = write_odd_valid_images(root / "odd/test/real", seed=0)
    fake = write_odd_valid_images(root / "odd/test/fake", seed=100)
    report = check_tree(root, workers=1)
    assert report.problems == [], report.problems
    assert report.counts["odd"]["test"] == {"real": len(real), "fake": len(fake)}


def test_broken_files_are_errors_of_the_right_kind(good_tree: Path):
    label = good_tree / "alpha/test/fake"
    truncated_jpeg(label / "cut.jpg")
    (label / "zero.png").write_bytes(b"")
    (label / "text.png").write_text("this is not an image\n")
    png_declaring_size(label / "bomb.png", 100_000, 100_000)  # 10 gigapixels claimed
    report = check_tree(good_tree, workers=1)
    assert not report.ok
    found = kinds(report)
    assert found["alpha/test/fake/cut.jpg"] == "corrupt"
    assert found["alpha/test/fake/zero.png"] == "empty"
    assert found["alpha/test/fake/text.png"] == "not_image"
    assert found["alpha/test/fake/bomb.png"] == "too_large"
    assert all(p["severity"] == "error" for p in report.problems if p["kind"] != "imbalance")


def test_pixel_limit_comes_from_the_parameter(tmp_path: Path):
    root = tmp_path / "tree"
    save_image(root / "d/val/real/a.png", size=(50, 50), seed=1)   # 2500 px: over 2x the limit
    save_image(root / "d/val/fake/b.png", size=(40, 40), seed=2)   # 1600 px: over the limit
    report = check_tree(root, max_pixels=1000, workers=1)
    assert kinds(report) == {"d/val/real/a.png": "too_large", "d/val/fake/b.png": "too_large"}
    assert check_tree(root, max_pixels=3000, workers=1).ok


def test_wrong_folder_names_are_unexpected_dirs(good_tree: Path):
    save_image(good_tree / "alpha/Train/real/x.png", seed=7)
    save_image(good_tree / "alpha/train/FAKE/y.png", seed=8)
    save_image(good_tree / "alpha/train/real/nested/z.png", seed=9)
    report = check_tree(good_tree, workers=1)
    found = kinds(report)
    for rel in ("alpha/Train", "alpha/train/FAKE", "alpha/train/real/nested"):
        assert found[rel] == "unexpected_dir"
    assert not report.ok
    assert report.counts["alpha"]["train"] == {"real": 2, "fake": 2}  # nothing counted in them
    images, unexpected = scan_tree(good_tree)
    assert sorted(unexpected) == ["alpha/Train", "alpha/train/FAKE", "alpha/train/real/nested"]
    assert [i.rel for i in images] == sorted(i.rel for i in images)


def test_duplicates_within_a_split_and_leaks_across_splits(good_tree: Path):
    original = good_tree / "alpha/train/real/real_0.png"
    shutil.copy(original, good_tree / "alpha/train/real/real_0_copy.png")        # same split, domain
    shutil.copy(original, good_tree / "beta/train/fake/other_domain.png")  # same split, other domain
    shutil.copy(original, good_tree / "beta/test/real/leaked.png")         # another split
    report = check_tree(good_tree, workers=1)
    found = kinds(report)
    assert found["alpha/train/real/real_0_copy.png"] == "duplicate"
    assert found["beta/train/fake/other_domain.png"] == "duplicate"
    assert found["beta/test/real/leaked.png"] == "leak"
    assert "alpha/train/real/real_0.png" not in found  # the original is not blamed
    details = {p["path"]: p["detail"] for p in report.problems}
    assert "alpha/train/real/real_0.png" in details["beta/test/real/leaked.png"]
    assert "labelled differently" in details["beta/train/fake/other_domain.png"]
    assert not report.ok


def test_small_images_and_imbalance_are_only_warnings(tmp_path: Path):
    root = tmp_path / "tree"
    save_image(root / "d/train/real/tiny.png", size=(20, 50), seed=1)
    for i in range(3):
        save_image(root / f"d/train/fake/f{i}.png", seed=10 + i)
    report = check_tree(root, min_side=32, imbalance_ratio=1.5, workers=1)
    assert report.ok
    assert kinds(report) == {"d/train/real/tiny.png": "too_small", "d/train": "imbalance"}
    assert check_tree(root, min_side=16, imbalance_ratio=4, workers=1).problems == []


def test_empty_tree_is_an_error_and_missing_root_a_usage_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert kinds(check_tree(tmp_path / "empty", workers=1)) == {".": "no_images"}
    with pytest.raises(UsageError):
        check_tree(tmp_path / "missing")


def test_process_pool_gives_the_same_report(tmp_path: Path):
    root = tmp_path / "tree"
    make_tree(root, n=12, domains=("a", "b"), size=(8, 8))  # 144 images: over the inline limit
    (root / "a/val/real/real_0.png").write_bytes(b"")
    seen = []
    pooled = check_tree(root, workers=2, progress=lambda done, total: seen.append((done, total)))
    inline = check_tree(root, workers=1)
    assert pooled.to_json() == inline.to_json()
    assert seen[0] == (0, 144) and seen[-1] == (144, 144)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert "a/val/real/real_0.png" in kinds(pooled)


def test_safe_image_path_refuses_escapes(tmp_path: Path):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d/link").symlink_to(tmp_path)
    assert safe_image_path(root, "d/x.png") == root / "d/x.png"
    for bad in ("../x.png", "d/../../x.png", "/etc/passwd", "d/link/x.png"):
        with pytest.raises(DxError):
            safe_image_path(root, bad)


# ---------------------------------------------------------------- CLI


def test_cli_json_is_one_object_with_the_documented_shape(good_tree: Path):
    result = runner.invoke(app, ["dataset", "check", str(good_tree), "--json"])
    assert exit_status(result) == 0
    data = json.loads(result.stdout)  # the whole stdout is one JSON object
    assert set(data) == {"ok", "counts", "problems"} and data["ok"] is True
    assert data["counts"]["beta"]["test"] == {"real": 2, "fake": 2}


def test_cli_exit_1_on_errors_and_problem_shape(good_tree: Path):
    (good_tree / "alpha/val/real/zero.png").write_bytes(b"")
    result = runner.invoke(app, ["dataset", "check", str(good_tree), "--json"])
    assert exit_status(result) == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert data["problems"] == [{"path": "alpha/val/real/zero.png", "kind": "empty",
                                 "detail": "zero bytes"}]


def test_cli_reads_dataset_config_keys(good_tree: Path):
    args = ["dataset", "check", str(good_tree), "--json", "--set", "dataset.min_side=100"]
    data = json.loads(runner.invoke(app, args).stdout)
    assert data["ok"] and {p["kind"] for p in data["problems"]} == {"too_small"}
    typo = runner.invoke(app, ["dataset", "check", str(good_tree), "--set", "dataset.min_sid=1"])
    assert exit_status(typo) == 2 and "min_side" in typo.output


def test_cli_table_and_usage_errors(good_tree: Path, tmp_path: Path):
    result = runner.invoke(app, ["dataset", "check", str(good_tree)])
    assert exit_status(result) == 0 and "alpha" in result.stdout and "ok" in result.stdout
    assert exit_status(runner.invoke(app, ["dataset", "check", str(tmp_path / "nope")])) == 2
    negative = ["dataset", "check", str(good_tree), "--workers", "-1"]
    assert exit_status(runner.invoke(app, negative)) == 2


def test_dx_process_prints_one_red_line_and_exits_2(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "dxcli", "dataset", "check", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: not a directory"]


def test_a_leak_blames_the_later_split_copy(good_tree: Path):
    """With one copy in train and one in test, the test copy is the leak, whatever the paths sort as."""
    original = good_tree / "beta/train/real/real_0.png"
    shutil.copy(original, good_tree / "alpha/test/fake/aaa_first_by_name.png")
    found = kinds(check_tree(good_tree, workers=1))
    assert found == {"alpha/test/fake/aaa_first_by_name.png": "leak"}
