"""The field's dataset layouts: ForenSynths, GenImage, Chameleon and trees without split folders are
read as (domain, split, label) by every command, checked, and turned into dx trees of hard links."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dxcli.base.errors import DxError, UsageError
from dxcli.cli.main import app
from dxcli.data.check import check_tree
from dxcli.data.questions import generate_questions
from dxcli.data.records import default_reasoning, load_records, records_from_tree
from dxcli.data.split import split_pool, write_records
from dxcli.data.tree import scan_tree, walk_tree
from helpers_images import exit_status, save_image, snapshot

runner = CliRunner()
_seed = [0]


def images(folder: Path, n: int = 2, prefix: str = "img") -> None:
    """n distinct tiny PNGs in `folder` (every call's bytes differ from every other's)."""
    for i in range(n):
        _seed[0] += 1
        save_image(folder / f"{prefix}_{i}.png", size=(8, 8), seed=_seed[0])


def labelled(folder: Path, real: str = "0_real", fake: str = "1_fake", n: int = 2) -> None:
    images(folder / real, n)
    images(folder / fake, n)


def forensynths(root: Path) -> Path:
    """train/<category>, val/<category>, test/<generator>/[<category>/], as CNNDetection ships it;
    `train` is one of ProGAN's LSUN categories, so test/progan/train/ is a category, not a split."""
    for category in ("airplane", "train"):
        labelled(root / "train" / category)
    labelled(root / "val" / "car", n=1)
    for category in ("car", "train"):
        labelled(root / "test/progan" / category, n=1)
    labelled(root / "test/biggan")
    return root


def genimage(root: Path) -> Path:
    for generator, subset in (("ADM", "imagenet_ai_0508_adm"), ("BigGAN", "imagenet_ai_0419_biggan")):
        labelled(root / generator / subset / "train", "nature", "ai", n=2)
        labelled(root / generator / subset / "val", "nature", "ai", n=1)
    return root


def counts(tree: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{domain: {split: (real, fake)}} of the non-empty splits."""
    found: dict[str, dict[str, tuple[int, int]]] = {}
    for image in scan_tree(tree)[0]:
        real, fake = found.setdefault(image.domain, {}).get(image.split, (0, 0))
        found[image.domain][image.split] = (real + (image.label == "real"), fake + (image.label == "fake"))
    return found


# ---------------------------------------------------------------- reading each layout


def test_forensynths_train_is_progan_and_categories_fold_into_their_generator(tmp_path: Path):
    root = forensynths(tmp_path / "CNNDetection")
    listing = walk_tree(root)
    assert listing.layout.name == "forensynths" and listing.unexpected_dirs == []
    assert counts(root) == {"progan": {"train": (4, 4), "val": (1, 1), "test": (2, 2)},
                            "biggan": {"test": (2, 2)}}
    assert any("ProGAN" in note for note in listing.layout.notes)
    by_rel = {image.rel: image for image in listing.images}
    assert by_rel["test/progan/train/1_fake/img_0.png"].split == "test"  # the category called train
    assert by_rel["train/airplane/0_real/img_1.png"].folded == ("airplane",)
    report = check_tree(root, workers=1, min_side=1)
    assert report.ok, report.problems
    assert report.counts["progan"]["train"] == {"real": 4, "fake": 4} and report.images == 18


def test_forensynths_test_set_without_split_folder_is_test(tmp_path: Path):
    root = tmp_path / "CNN_synth_testset"
    for category in ("airplane", "car", "train"):  # mostly categories: `train` is one of them
        labelled(root / "progan" / category, n=1)
    labelled(root / "biggan")
    labelled(root / "stylegan" / "bedroom", n=1)
    listing = walk_tree(root)
    assert listing.layout.name == "no-split" and not listing.layout.split_folders
    assert counts(root) == {"progan": {"test": (3, 3)}, "biggan": {"test": (2, 2)},
                            "stylegan": {"test": (1, 1)}}
    assert any("test split" in note for note in listing.layout.notes)
    assert any("category" in note for note in listing.layout.notes)


def test_genimage_subsets_fold_into_the_generator(tmp_path: Path):
    root = genimage(tmp_path / "GenImage")
    listing = walk_tree(root)
    assert listing.layout.name == "genimage" and listing.unexpected_dirs == []
    assert counts(root) == {"ADM": {"train": (2, 2), "val": (1, 1)}, "BigGAN": {"train": (2, 2), "val": (1, 1)}}
    assert check_tree(root, workers=1, min_side=1).ok


@pytest.mark.parametrize("inner", ["", "test"])
def test_chameleon_is_one_domain_named_after_the_root(tmp_path: Path, inner: str):
    root = tmp_path / "Chameleon"
    labelled(root / inner, n=3)
    (root / "README.txt").write_text("a published test set")  # files at ROOT are not part of the tree
    listing = walk_tree(root)
    assert listing.layout.name == "chameleon" and listing.stray_files == []
    assert counts(root) == {"Chameleon": {"test": (3, 3)}}
    report = check_tree(root, workers=1, min_side=1)
    assert report.ok and report.counts["Chameleon"]["test"] == {"real": 3, "fake": 3}


def test_dx_layout_takes_the_label_aliases_and_junk_stays_unexpected(tmp_path: Path):
    root = tmp_path / "tree"
    for domain in ("ADM", "sd"):
        for split in ("train", "test"):
            labelled(root / domain / split, "nature", "ai", n=1)
    images(root / "sd" / "Train" / "real", 1)  # a misspelt split stays an unexpected folder
    listing = walk_tree(root)
    assert listing.layout.name == "dx" and listing.layout.notes == ()
    assert listing.unexpected_dirs == ["sd/Train"]
    assert counts(root) == {d: {"train": (1, 1), "test": (1, 1)} for d in ("ADM", "sd")}


def test_a_pool_without_split_folders_reads_as_test(tmp_path: Path):
    root = tmp_path / "pool"
    labelled(root / "alpha", "real", "fake")
    assert walk_tree(root).layout.name == "no-split"
    assert counts(root) == {"alpha": {"test": (2, 2)}}


# ---------------------------------------------------------------- ambiguous and mixed trees


def _mixed_labels(root: Path) -> None:
    images(root / "d/train/real", 1)
    images(root / "d/train/0_real", 1)
    images(root / "d/train/fake", 1)


def _dx_beside_no_split(root: Path) -> None:
    labelled(root / "a/train", "real", "fake", 1)
    labelled(root / "b", "real", "fake", 1)


def _splits_beside_domains(root: Path) -> None:
    labelled(root / "test/biggan", n=1)
    labelled(root / "stylegan", n=1)


def _split_or_category(root: Path) -> None:
    labelled(root / "progan/train", n=1)
    labelled(root / "progan/car", n=1)


def _dx_or_genimage(root: Path) -> None:
    labelled(root / "ADM/train", "nature", "ai", 1)
    labelled(root / "ADM/imagenet_ai/train", "nature", "ai", 1)


def _capital_splits(root: Path) -> None:
    labelled(root / "d/Train", "real", "fake", 1)
    labelled(root / "d/Test", "real", "fake", 1)


def _chameleon_or_forensynths(root: Path) -> None:
    labelled(root / "test", n=1)
    labelled(root / "val/car", n=1)


@pytest.mark.parametrize("build, says", [
    (_mixed_labels, "move the images of 0_real/ into real/"),
    (_dx_beside_no_split, "under <domain>/test/"),
    (_splits_beside_domains, "rename a domain called like a split"),
    (_split_or_category, "rename car to train|val|test"),
    (_dx_or_genimage, "GenImage"),
    (_chameleon_or_forensynths, "same depth"),
    (_capital_splits, "rename Test to test, Train to train"),
])
def test_ambiguous_trees_are_one_line_errors_that_say_what_to_rename(tmp_path: Path, build, says: str):
    root = tmp_path / "tree"
    build(root)
    with pytest.raises(DxError) as caught:
        walk_tree(root)
    message = str(caught.value)
    assert says in message and "\n" not in message
    result = runner.invoke(app, ["dataset", "check", str(root)])
    assert exit_status(result) == 1 and says in " ".join(result.output.split())


def test_a_symlink_loop_ends_at_the_depth_bound(tmp_path: Path):
    root = tmp_path / "tree"
    labelled(root / "a/test", "real", "fake", 1)
    os.symlink(root, root / "a" / "loop")  # a/loop/a/loop/... would never end without the bound
    os.symlink(root / "b", root / "b")  # a link to itself: not a folder, a stray file
    listing = walk_tree(root)
    assert listing.layout.name == "dx" and counts(root) == {"a": {"test": (1, 1)}}
    assert listing.unexpected_dirs == ["a/loop"]


# ---------------------------------------------------------------- dx dataset check output


def test_cli_check_names_the_layout_and_json_carries_it(tmp_path: Path):
    root = forensynths(tmp_path / "CNNDetection")
    result = runner.invoke(app, ["dataset", "check", str(root), "--set", "dataset.min_side=1"])
    text = " ".join(result.output.split())
    assert exit_status(result) == 0 and "layout: ForenSynths" in text and "domain progan" in text
    data = json.loads(runner.invoke(app, ["dataset", "check", str(root), "--json",
                                          "--set", "dataset.min_side=1"]).stdout)
    assert data["ok"] and data["layout"]["name"] == "forensynths"
    assert data["counts"]["biggan"]["test"] == {"real": 2, "fake": 2}
    dx = tmp_path / "dx"
    labelled(dx / "d/train", "real", "fake", 1)
    assert set(json.loads(runner.invoke(app, ["dataset", "check", str(dx), "--json", "--set",
                                              "dataset.min_side=1"]).stdout)) == {"ok", "counts", "problems"}


# ---------------------------------------------------------------- into a dx tree


def test_forensynths_splits_into_a_dx_tree_of_hard_links(tmp_path: Path):
    root = forensynths(tmp_path / "CNNDetection")
    before = snapshot(root)
    summary = split_pool(root, tmp_path / "out")
    assert summary["mode"] == "link" and summary["splits"] == "kept" and summary["images"] == 18
    assert counts(tmp_path / "out") == counts(root)  # the splits as read, now in the dx layout
    assert walk_tree(tmp_path / "out").layout.name == "dx"
    placed = tmp_path / "out/progan/test/fake/train_img_0.png"  # the category prefixes the name
    assert placed.stat().st_ino == (root / "test/progan/train/1_fake/img_0.png").stat().st_ino
    assert check_tree(tmp_path / "out", workers=1, min_side=1).ok
    assert snapshot(root) == before
    with pytest.raises(UsageError, match="already has split folders"):
        split_pool(root, tmp_path / "out2", "0.8,0.1,0.1")


def test_genimage_and_chameleon_split_into_dx_trees(tmp_path: Path):
    gen = genimage(tmp_path / "GenImage")
    split_pool(gen, tmp_path / "gen-dx", copy=True)
    copied = tmp_path / "gen-dx/ADM/val/fake/imagenet_ai_0508_adm_img_0.png"
    assert copied.stat().st_nlink == 1 and counts(tmp_path / "gen-dx") == counts(gen)
    cham = tmp_path / "Chameleon"
    labelled(cham, n=10)
    kept = split_pool(cham, tmp_path / "cham-dx")
    assert counts(tmp_path / "cham-dx") == {"Chameleon": {"test": (10, 10)}} and kept["splits"] == "kept"
    resplit = split_pool(cham, tmp_path / "cham-split", "0.6,0.2,0.2", seed=1)
    assert resplit["splits"] == "assigned" and resplit["mode"] == "link"
    assert counts(tmp_path / "cham-split") == {"Chameleon": {s: (n, n) for s, n in
                                                             (("train", 6), ("val", 2), ("test", 2))}}


def test_a_failed_hard_link_is_an_error_that_names_the_ways_out(tmp_path: Path, monkeypatch):
    root = tmp_path / "Chameleon"
    labelled(root, n=1)

    def cross_device(source, dest):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    with pytest.raises(DxError, match="--copy.*reads the tree in place"):
        split_pool(root, tmp_path / "out")
    with pytest.raises(UsageError, match="exclude"):
        split_pool(root, tmp_path / "out2", link=True, copy=True)


def test_cli_split_says_what_it_did(tmp_path: Path):
    root = genimage(tmp_path / "GenImage")
    result = runner.invoke(app, ["dataset", "split", str(root), "--out", str(tmp_path / "out")])
    text = " ".join(result.output.split())
    assert exit_status(result) == 0
    assert "layout: GenImage" in text and "hard links" in text and "splits kept as read" in text
    assert "no image copied" in text
    cham = tmp_path / "Chameleon"
    labelled(cham, n=1)
    records = runner.invoke(app, ["dataset", "split", str(cham), "--records", "--out", str(tmp_path / "rec")])
    text = " ".join(records.output.split())
    assert exit_status(records) == 0 and "layout: Chameleon" in text and "split test" in text


# ---------------------------------------------------------------- every reader sees the layout


def test_records_questions_and_training_data_read_the_tree_in_place(tmp_path: Path):
    root = forensynths(tmp_path / "CNNDetection")
    write_records(root, tmp_path / "rec", None)
    test = load_records(tmp_path / "rec/test.json", root)  # paths stay inside the source tree
    assert {(r.domain, r.binary_label) for r in test} == {("progan", 0), ("progan", 1), ("biggan", 0),
                                                          ("biggan", 1)}
    assert all((root / r.image).is_file() for r in test)
    questions, _ = generate_questions(root, n=None, seed=0, balanced=False, split="test", domain="biggan")
    assert {q["label"] for q in questions} == {"real", "fake"} and len(questions) == 4
    # what `dx train ... --data TREE` builds (dxcli/jobs/prepare.py): ForenSynths' train is ProGAN
    train = records_from_tree(root, splits=("train",), reasoning=default_reasoning(root))
    assert len(train) == 8 and {r.domain for r in train} == {"progan"}


def test_records_pointing_into_the_fields_layouts_take_their_labels_from_the_path(tmp_path):
    """A LLaVA-format records file whose images sit in a GenImage or ForenSynths tree, without
    `binary_label`: the label comes from the `ai`/`nature`/`0_real`/`1_fake` folder; the domain is
    not guessed from a subset or category folder."""
    rows = [{"image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                               {"from": "gpt", "value": "**Look**: fine.\n\n### Answer: real"}]}
            for image in ("sdv14/imagenet_ai/train/ai/x.png", "progan/train/airplane/0_real/y.png",
                          "alpha/train/fake/z.png")]
    for row in rows:
        images(tmp_path / "root" / Path(row["image"]).parent, n=1, prefix=Path(row["image"]).stem)
        row["image"] = str(Path(row["image"]).parent / f"{Path(row['image']).stem}_0.png")
    path = tmp_path / "records.json"
    path.write_text(json.dumps(rows))
    records = load_records(path, tmp_path / "root")
    assert [r.binary_label for r in records] == [1, 0, 1]  # the path's label, not the answer's `real`
    assert [r.domain for r in records][2] == "alpha"
    assert all(r.domain not in ("imagenet_ai", "airplane") for r in records)
