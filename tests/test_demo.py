"""The built-in demo data: tree layout, determinism, reasoning that agrees with the image and the
PRPO lexicon, measured generator traces, and separability by a tiny CNN trained in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dxcli.base.answer import parse_answer
from dxcli.data import demo, demo_reasoning, demo_render
from dxcli.data.demo import make_demo
from dxcli.data.demo_reasoning import measure
from dxcli.data.demo_render import DOMAINS, PIPELINES
from dxcli.base.errors import UsageError
from helpers_images import assert_demo_layout

SMALL = {"n_train": 40, "n_val": 8, "n_test": 16}
SPLIT_SIZES = {"train": 40, "val": 8, "test": 16}


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_reasoning(root: Path) -> dict[str, str]:
    lines = (root / "reasoning.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(set(row) == {"image", "reasoning"} for row in rows)
    texts = {row["image"]: row["reasoning"] for row in rows}
    assert len(texts) == len(rows), "an image has two reasoning lines"
    return texts


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "out"
    return root, make_demo(root, seed=0, **SMALL)


def test_tree_layout_counts_and_summary(small_demo):
    root, summary = small_demo
    assert len(DOMAINS) >= 4
    images = assert_demo_layout(root, summary, DOMAINS, SPLIT_SIZES)
    assert summary["domains"] == list(DOMAINS)
    assert summary["bytes"] == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert summary["seconds"] > 0
    for path in images[::7]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (96, 96)


def test_no_two_images_are_identical(small_demo):
    root, _ = small_demo
    contents = [p.read_bytes() for p in root.glob("*/*/*/*.png")]
    assert len(set(contents)) == len(contents)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(small_demo, tmp_path):
    root, _ = small_demo
    calls = []
    make_demo(tmp_path / "again", seed=0, workers=1, progress=lambda done, total: calls.append(
        (done, total)), **SMALL)  # serial this time: the pool must not change any byte
    assert tree_files(tmp_path / "again") == tree_files(root)
    total = len(DOMAINS) * sum(SPLIT_SIZES.values())
    assert calls[-1] == (total, total) and len(calls) == total

    make_demo(tmp_path / "other", seed=1, n_train=2, n_val=2, n_test=2)
    other = tree_files(tmp_path / "other")
    original = tree_files(root)
    shared = [name for name in other if name.endswith(".png")]
    assert len(shared) == len(DOMAINS) * 6
    assert all(other[name] != original[name] for name in shared)


def test_every_image_has_reasoning_ending_in_its_folder_label(small_demo):
    root, _ = small_demo
    texts = read_reasoning(root)
    images = {p.relative_to(root).as_posix() for p in root.glob("*/*/*/*.png")}
    assert set(texts) == images
    for rel, text in texts.items():
        label = rel.split("/")[2]
        assert parse_answer(text) == label
        assert text.endswith(f"### Answer: {label}")
        paragraphs = text.split("\n\n")
        assert 4 <= len(paragraphs) <= 5, text
        assert all(p.startswith("**") and "**: " in p for p in paragraphs[:-1]), text
        assert 25 <= len(text.split()) <= 90, text


def test_every_paragraph_carries_evidence_for_the_answer(small_demo):
    """Scored with the PRPO lexicon (METHOD.md §9): each paragraph before the answer is labelled
    with the answer's class, so the Prediction Consistency Reward of the answer is 1."""
    from dxcli.rl.rewards import score_response

    root, _ = small_demo
    for rel, text in read_reasoning(root).items():
        score = score_response(text)
        final = score.final_index
        assert score.labels[:final] == [rel.split("/")[2]] * final, text
        assert score.pcr[final] == 1.0


def test_texts_vary_between_images(small_demo):
    root, _ = small_demo
    texts = read_reasoning(root)
    for label in ("real", "fake"):
        chosen = [t for rel, t in texts.items() if rel.split("/")[2] == label]
        assert len(set(chosen)) > len(chosen) // 3


TRACE_WORDS = {  # what each domain's fake texts name, from that domain's measured trace
    "gan": ("checkerboard",),
    "diffusion": ("8-pixel", "8 pixels", "overly smooth"),
    "banding": ("banding",),
    "resample": ("4-pixel", "block"),
}


def test_fake_texts_name_the_trace_measured_on_their_image(small_demo):
    root, _ = small_demo
    for rel, text in read_reasoning(root).items():
        domain, _, label = rel.split("/")[:3]
        traces = measure(np.asarray(Image.open(root / rel)))
        if label == "fake":
            assert any(word in text for word in TRACE_WORDS[domain]), (rel, traces, text)
        else:
            named = [w for words in TRACE_WORDS.values() for w in words if w in text]
            assert named in ([], ["banding"]), text  # real texts say "free of banding" at most
            assert "banding" not in text or "free of banding" in text
            assert traces.checker < demo_reasoning.CHECKER and traces.level_fill > demo_reasoning.BANDED_FILL


@pytest.mark.parametrize("domain", DOMAINS)
def test_each_pipeline_leaves_its_own_trace(domain):
    """The same crop, before and after a domain's generator: only its trace crosses a threshold."""
    job = demo.plan_jobs(seed=3, counts_per_split={"train": 2, "val": 2, "test": 2}, size=96)[0]
    real = measure(np.clip(np.rint(demo_render.real_crop(job)), 0, 255).astype(np.uint8))
    fake_pixels = PIPELINES[domain](demo_render.real_crop(job), np.random.default_rng(0))
    fake = measure(np.clip(np.rint(fake_pixels), 0, 255).astype(np.uint8))
    crossed = {
        "gan": fake.checker > demo_reasoning.CHECKER,
        "diffusion": fake.grid8 > demo_reasoning.GRID8 and fake.noise_evenness > demo_reasoning.EVEN_NOISE,
        "banding": fake.level_fill < demo_reasoning.BANDED_FILL,
        "resample": fake.grid4 > demo_reasoning.GRID4 and fake.blockiness > demo_reasoning.BLOCKY,
    }
    assert crossed[domain], fake
    assert [d for d, hit in crossed.items() if hit] == [domain], fake
    assert real.checker < demo_reasoning.CHECKER and real.level_fill > demo_reasoning.BANDED_FILL
    assert real.blockiness < demo_reasoning.BLOCKY


@pytest.mark.parametrize("bad", [
    {"n_train": 7}, {"n_val": 0}, {"n_test": -2}, {"size": 100}, {"size": 16}, {"size": 512},
])
def test_bad_arguments_are_usage_errors(tmp_path, bad):
    with pytest.raises(UsageError):
        make_demo(tmp_path / "out", **bad)


def test_a_non_empty_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    (out / "gan" / "train" / "real").mkdir(parents=True)
    (out / "gan" / "train" / "real" / "stale.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        make_demo(out, n_train=2, n_val=2, n_test=2)
    summary = make_demo(out, n_train=2, n_val=2, n_test=2, overwrite=True)
    assert not (out / "gan" / "train" / "real" / "stale.png").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only the demo's own folders are replaced
    assert len(list(out.glob("*/*/*/*.png"))) == summary["images"] == len(DOMAINS) * 6
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        make_demo(tmp_path / "file")


# ------------------------------------------------------------------ separability

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_split(root: Path, split: str):
    import torch

    paths = sorted(root.glob(f"*/{split}/*/*.png"))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    y = torch.tensor([p.parent.name == "fake" for p in paths], dtype=torch.float32)
    return x, y, [p.parts[-4] for p in paths]


def test_a_tiny_randomly_initialised_convnext_separates_real_from_fake(small_demo):
    """The traces are plain enough for a 0.27M-parameter ConvNeXt trained for seconds on CPU
    (100 steps: about 6 s on one idle core)."""
    import torch

    root, _ = small_demo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, 2 threads can be 20x slower than 1
    try:
        steps, auc, per_domain = train_and_score(root)
    finally:
        torch.set_num_threads(threads)
    assert auc >= 0.9, (steps, auc, per_domain)


def train_and_score(root: Path, steps: int = 100) -> tuple[int, float, dict[str, float]]:
    """Train on the train split (AdamW, batch 32, no augmentation); ROC-AUC on the test split."""
    import timm
    import torch
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    x_train, y_train, _ = load_split(root, "train")
    x_test, y_test, domains = load_split(root, "test")
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=1,
                              depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randperm(len(x_train), generator=order)[:32]
        logits = model(x_train[batch]).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(x_test).squeeze(1).numpy()
    auc = roc_auc_score(y_test.numpy(), scores)
    per_domain = {d: roc_auc_score(y_test.numpy()[np.array(domains) == d],
                                   scores[np.array(domains) == d]) for d in DOMAINS}
    return steps, auc, per_domain
