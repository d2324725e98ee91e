"""`dx dataset demo --hard`: same tree layout as the default demo, more source photographs,
byte-identical output for a seed, reasoning that agrees with each image's label, and a default
demo that the option leaves alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dxcli.base.answer import parse_answer
from dxcli.data import demo, demo_render
from dxcli.data.demo import make_demo
from dxcli.data.demo_render import DOMAINS
from helpers_images import assert_demo_layout

SMALL = {"n_train": 8, "n_val": 4, "n_test": 4}
SPLIT_SIZES = {"train": 8, "val": 4, "test": 4}


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hard_demo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hard") / "out"
    return root, make_demo(root, seed=0, hard=True, **SMALL)


def test_tree_layout_and_summary(hard_demo):
    root, summary = hard_demo
    images = assert_demo_layout(root, summary, DOMAINS, SPLIT_SIZES)
    assert summary["difficulty"] == "hard"
    for path in images[::9]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (96, 96)
    contents = [p.read_bytes() for p in images]
    assert len(set(contents)) == len(contents)


def test_more_distinct_source_photographs_than_the_default():
    counts = {"train": 40, "val": 8, "test": 16}
    default = {job.photo for job in demo.plan_jobs(seed=0, counts_per_split=counts, size=96)}
    hard = {job.photo for job in demo.plan_jobs(seed=0, counts_per_split=counts, size=96, hard=True)}
    assert default <= set(demo_render.PHOTOS)
    assert len(hard) > len(default) and len(hard) >= 8
    assert any(photo.startswith("skimage/") for photo in hard)
    for photo in demo_render.HARD_PHOTOS:  # every one loads offline, from the installed wheels
        width, height = demo_render._photo_size(photo)
        assert min(width, height) >= 128


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(hard_demo, tmp_path):
    root, _ = hard_demo
    make_demo(tmp_path / "again", seed=0, hard=True, workers=1, **SMALL)
    assert tree_files(tmp_path / "again") == tree_files(root)
    make_demo(tmp_path / "other", seed=1, hard=True, **SMALL)
    other, original = tree_files(tmp_path / "other"), tree_files(root)
    pngs = [name for name in other if name.endswith(".png")]
    assert all(other[name] != original[name] for name in pngs)


def test_the_default_demo_is_not_the_hard_one(hard_demo, tmp_path):
    root, _ = hard_demo
    summary = make_demo(tmp_path / "default", seed=0, **SMALL)
    assert summary["difficulty"] == "default"
    default = tree_files(tmp_path / "default")
    assert all(default[name] != data for name, data in tree_files(root).items()
               if name.endswith(".png"))


def test_reasoning_agrees_with_every_label(hard_demo):
    """Texts are written from the measured image: every paragraph carries evidence for the
    folder's label (PRPO lexicon), whatever the trace strength."""
    from dxcli.rl.rewards import score_response

    root, _ = hard_demo
    rows = [json.loads(line) for line in (root / "reasoning.jsonl").read_text().splitlines()]
    assert {row["image"] for row in rows} == {p.relative_to(root).as_posix()
                                              for p in root.glob("*/*/*/*.png")}
    for row in rows:
        label = row["image"].split("/")[2]
        assert parse_answer(row["reasoning"]) == label
        score = score_response(row["reasoning"])
        assert score.labels[:score.final_index] == [label] * score.final_index, row
        assert score.pcr[score.final_index] == 1.0


def test_trace_strength_is_graded_per_image():
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        low, high, _ = demo_render.HARD_STRENGTH[domain]
        strengths = [demo_render.trace_strength(domain, rng) for _ in range(400)]
        assert low <= min(strengths) < low + 0.1 and high - 0.1 < max(strengths) <= high
        assert sum(s < low + 0.15 for s in strengths) >= 20  # a share of fakes carry a faint trace


def test_every_domain_shares_a_period_4_trace_only_in_its_shared_variant():
    """Transfer across domains goes through the period-4 family: each domain's shared variant
    leaves a 4-pixel grid, its private variant none (no more than a real crop has)."""
    from dxcli.data.demo_reasoning import measure

    counts = {"train": 24, "val": 2, "test": 2}
    jobs = [job for job in demo.plan_jobs(seed=0, counts_per_split=counts, size=96, hard=True)
            if job.domain == "gan" and job.split == "train"]

    def grid4(pipeline) -> float:
        rng = np.random.default_rng(0)
        values = []
        for job in jobs:
            pixels = demo_render.real_crop(job)
            image = pixels if pipeline is None else pipeline(pixels, rng)
            values.append(measure(np.clip(np.rint(image), 0, 255).astype(np.uint8)).grid4)
        return float(np.median(values))

    real = grid4(None)
    for domain in DOMAINS:
        shared, private = grid4(demo_render.HARD_PIPELINES[domain]), grid4(demo_render.HARD_PRIVATE_PIPELINES[domain])
        assert shared > 3 * max(private, real), (domain, shared, private, real)
        assert private < 2 * real, (domain, private, real)
    assert 0.3 <= demo_render.HARD_SHARED_SHARE <= 0.9


def test_hard_fake_trace_replays_the_variant_the_image_was_drawn_with(hard_demo):
    """A private-variant fake has no 4-pixel grid of its own; a strong shared one does."""
    from dxcli.data.demo_reasoning import measure

    root, _ = hard_demo
    jobs = [job for job in demo.plan_jobs(seed=0, counts_per_split=SPLIT_SIZES, size=96, hard=True)
            if job.label == "fake"]
    traces = {job.rel: demo_render.hard_fake_trace(job) for job in jobs}
    assert {variant for variant, _ in traces.values()} == {"shared", "private"}
    grid = {rel: measure(np.asarray(Image.open(root / rel))).grid4 for rel in traces}
    private = [grid[rel] for rel, (variant, _) in traces.items() if variant == "private"]
    strong_shared = [grid[rel] for rel, (variant, s) in traces.items() if variant == "shared" and s > 0.6]
    assert np.median(strong_shared) > 3 * np.median(private), (strong_shared, private)
