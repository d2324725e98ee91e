"""dx dataset split: pool -> split tree, records from a tree, leave-one-domain-out."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dxcli.cli.main import app
from dxcli.data.check import check_tree
from dxcli.data.records import load_records
from dxcli.data.split import parse_ratios, split_pool, write_records
from dxcli.data.tree import scan_tree
from dxcli.base.errors import DxError, UsageError
from helpers_images import exit_status, make_pool, make_tree, sha256, snapshot

runner = CliRunner()


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    root = tmp_path / "pool"
    make_pool(root, n=20)
    return root


def layout(out: Path) -> dict[str, str]:
    """file name -> split, over a split tree."""
    return {Path(image.rel).name + "@" + image.domain + image.label: image.split
            for image in scan_tree(out)[0]}


def test_split_is_stratified_and_deterministic(pool: Path, tmp_path: Path):
    summary = split_pool(pool, tmp_path / "a", (0.8, 0.1, 0.1), seed=3, link=False, force=False)
    split_pool(pool, tmp_path / "b", (0.8, 0.1, 0.1), seed=3, link=False, force=False)
    split_pool(pool, tmp_path / "c", (0.8, 0.1, 0.1), seed=4, link=False, force=False)
    assert layout(tmp_path / "a") == layout(tmp_path / "b")
    assert layout(tmp_path / "a") != layout(tmp_path / "c")
    for domain in ("alpha", "beta"):
        assert summary["counts"][domain] == {"train": {"real": 16, "fake": 16},
                                             "val": {"real": 2, "fake": 2},
                                             "test": {"real": 2, "fake": 2}}
    assert summary["images"] == 80 and check_tree(tmp_path / "a", workers=1, min_side=1).ok


def test_identical_content_never_lands_in_two_splits(pool: Path, tmp_path: Path):
    source = pool / "alpha/real/real_000.png"
    for i in range(6):  # copies under other names, another label and another domain
        shutil.copy(source, pool / f"alpha/real/copy_{i}.png")
        shutil.copy(source, pool / f"beta/fake/copy_{i}.png")
    before = snapshot(pool)
    summary = split_pool(pool, tmp_path / "out", "0.5,0.25,0.25", seed=0, link=False, force=False)
    digests = Counter(sha256(p) for p in (tmp_path / "out").rglob("*.png"))
    assert digests[sha256(source)] == 1 and max(digests.values()) == 1
    assert len(summary["duplicates_skipped"]) == 12
    assert {d["same_as"] for d in summary["duplicates_skipped"]} == {"alpha/real/copy_0.png"}
    assert check_tree(tmp_path / "out", workers=1, min_side=1, imbalance_ratio=10).ok
    assert snapshot(pool) == before  # originals untouched


def test_originals_untouched_and_link_makes_hard_links(pool: Path, tmp_path: Path):
    before = snapshot(pool)
    split_pool(pool, tmp_path / "out", (0.8, 0.1, 0.1), seed=0, link=True, force=False)
    assert snapshot(pool) == before
    for image in scan_tree(tmp_path / "out")[0]:
        placed = tmp_path / "out" / image.rel
        original = pool / image.domain / image.label / placed.name
        assert placed.stat().st_ino == original.stat().st_ino and placed.stat().st_nlink == 2


def test_existing_out_needs_force_and_force_replaces_only_a_split_tree(pool: Path, tmp_path: Path):
    out = tmp_path / "out"
    split_pool(pool, out, (0.8, 0.1, 0.1), seed=0, link=False, force=False)
    with pytest.raises(UsageError, match="--force"):
        split_pool(pool, out, (0.8, 0.1, 0.1), seed=1, link=False, force=False)
    (out / "train.json").write_text("[]")
    split_pool(pool, out, (0.5, 0.5, 0.0), seed=1, link=False, force=True)
    assert set(layout(out).values()) == {"train", "val"}  # the old test files are gone
    assert (out / "train.json").exists()  # files beside the tree are left alone
    (out / "mine" / "photos").mkdir(parents=True)
    with pytest.raises(UsageError, match="refusing"):
        split_pool(pool, out, (0.8, 0.1, 0.1), seed=0, link=False, force=True)
    assert (out / "mine" / "photos").is_dir()


@pytest.mark.parametrize("ratios", ["0.5,0.5", "a,b,c", "0.9,0.2,0.1", "1.2,-0.1,-0.1", "nan,0,1"])
def test_bad_ratios_are_usage_errors(ratios: str):
    with pytest.raises(UsageError):
        parse_ratios(ratios)


def test_bad_pools_and_overlapping_out(pool: Path, tmp_path: Path):
    with pytest.raises(UsageError):
        split_pool(pool, pool / "inside", (0.8, 0.1, 0.1), 0, False, False)
    tree = tmp_path / "tree"
    make_tree(tree, n=1, domains=("d",))
    with pytest.raises(DxError, match="--records"):  # a split tree given as a pool
        split_pool(tree, tmp_path / "x", (0.8, 0.1, 0.1), 0, False, False)
    with pytest.raises(UsageError):
        split_pool(tmp_path / "missing", tmp_path / "y", (0.8, 0.1, 0.1), 0, False, False)


# ---------------------------------------------------------------- records


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    make_tree(root, n=2, domains=("alpha", "beta", "gamma"))
    return root


def test_records_with_and_without_reasoning(tree: Path, tmp_path: Path):
    reasoning = {
        "alpha/train/fake/fake_0.png": "**Texture**: overly smooth skin.\n\n### Answer: fake",
        "alpha/train/real/real_0.png": "**Texture**: natural pores.",  # no marker: one is added
    }
    summary = write_records(tree, tmp_path / "rec", reasoning)
    records = {r.image: r for r in load_records(tmp_path / "rec/train.json", tree)}
    assert len(records) == 12 and summary["files"]["train"]["with_reasoning"] == 2
    assert records["alpha/train/fake/fake_0.png"].answer == reasoning["alpha/train/fake/fake_0.png"]
    assert records["alpha/train/real/real_0.png"].answer == \
        "**Texture**: natural pores.\n\n### Answer: real"
    assert records["beta/train/fake/fake_1.png"].answer == "### Answer: fake"
    assert records["beta/train/fake/fake_1.png"].binary_label == 1
    assert records["gamma/train/real/real_1.png"].binary_label == 0
    assert {r.domain for r in load_records(tmp_path / "rec/test.json")} == {"alpha", "beta", "gamma"}
    with pytest.raises(UsageError, match="--force"):
        write_records(tree, tmp_path / "rec", reasoning)


def test_holdout_records_leave_one_domain_out(tree: Path, tmp_path: Path):
    summary = write_records(tree, tmp_path / "rec", None, holdout="beta")
    train = load_records(tmp_path / "rec/train.json")
    val = load_records(tmp_path / "rec/val.json")
    test = load_records(tmp_path / "rec/test.json")
    assert {r.domain for r in train} == {r.domain for r in val} == {"alpha", "gamma"}
    assert {r.domain for r in test} == {"beta"}
    assert all("/test/" in r.image for r in test) and len(test) == 4
    assert summary["files"]["test"]["domains"] == ["beta"]
    with pytest.raises(UsageError, match="alpha, beta, gamma"):
        write_records(tree, tmp_path / "rec2", None, holdout="delta")


# ---------------------------------------------------------------- CLI


def test_cli_split_json_and_refusals(pool: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ["dataset", "split", str(pool), "--out", str(out), "--seed", "2", "--json"]
    result = runner.invoke(app, args)
    assert exit_status(result) == 0
    data = json.loads(result.stdout)
    assert data["counts"]["alpha"]["train"] == {"real": 16, "fake": 16} and data["mode"] == "copy"
    assert exit_status(runner.invoke(app, args)) == 2  # existing OUT
    assert exit_status(runner.invoke(app, args + ["--force"])) == 0
    bad = ["dataset", "split", str(pool), "--out", str(tmp_path / "o2"), "--ratios", "0.7,0.7,0.1"]
    assert exit_status(runner.invoke(app, bad)) == 2
    no_records = ["dataset", "split", str(pool), "--out", str(tmp_path / "o3"), "--holdout", "alpha"]
    assert exit_status(runner.invoke(app, no_records)) == 2


def test_cli_records_use_tree_reasoning_file(tree: Path, tmp_path: Path):
    line = {"image": "gamma/test/fake/fake_0.png", "reasoning": "**Edges**: warping.\n\n### Answer: fake"}
    (tree / "reasoning.jsonl").write_text(json.dumps(line) + "\n")
    args = ["dataset", "split", str(tree), "--records", "--out", str(tmp_path / "rec"),
            "--holdout", "gamma", "--json"]
    result = runner.invoke(app, args)
    assert exit_status(result) == 0
    data = json.loads(result.stdout)
    assert data["files"]["test"]["with_reasoning"] == 1 and data["reasoning"].endswith("reasoning.jsonl")
    test = {r.image: r.answer for r in load_records(tmp_path / "rec/test.json")}
    assert test["gamma/test/fake/fake_0.png"] == line["reasoning"]
    inside = ["dataset", "split", str(tree), "--records", "--out", str(tree / "records")]
    assert exit_status(runner.invoke(app, inside)) == 2  # never writes into the image tree
