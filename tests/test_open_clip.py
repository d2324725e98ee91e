"""VCR through open_clip (`--clip open_clip:ARCH[:PRETRAINED_OR_FILE]`): a tiny random open_clip
model whose config and weights are saved locally, loaded through the spec, scored like CLIP, used
by `dx eval rewards` and inside a PRPO step; and clear errors when the spec or the extra is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dxcli import config
from dxcli.base.errors import DxError
from dxcli.cli.main import app
from dxcli.rl.clip import OpenClipScorer, check_clip_spec, load_clip, parse_open_clip
from helpers_rl import quiet, save_tiny_open_clip, toy_image

ANSWER = "**Skin**: natural pores and realistic texture.\n\n### Answer: real"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    config_file, weights = save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))
    return {"config": config_file, "weights": weights, "spec": f"open_clip:{config_file}:{weights}"}


def reference_embeddings(tiny: dict, images: list[Image.Image], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same numbers straight from open_clip: the saved weights, its transform and tokenizer."""
    model, _, preprocess = open_clip.create_model_and_transforms(tiny["config"].stem)
    model.load_state_dict(torch.load(tiny["weights"]))
    model.eval()
    tokens = open_clip.get_tokenizer(tiny["config"].stem)(texts)
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        text = model.encode_text(tokens, normalize=True)
    return image, text


def test_the_spec_loads_the_saved_weights_and_scores_like_clip(tiny):
    scorer = load_clip(tiny["spec"])
    assert isinstance(scorer, OpenClipScorer) and tiny["config"].stem in scorer.name
    assert not any(p.requires_grad for p in scorer.model.parameters())  # frozen
    images, keywords = [toy_image("real"), toy_image("fake", seed=1)], ["skin texture", "real", "fake"]
    image_emb = scorer.image_embeddings(images)
    expected_image, expected_text = reference_embeddings(tiny, images, keywords)
    assert torch.allclose(image_emb, expected_image, atol=1e-5)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    values = scorer.vcr(image_emb[0], keywords)
    assert torch.allclose(values, ((expected_text @ expected_image[0]).clamp(-1, 1) + 1) / 2, atol=1e-5)
    assert bool(((values >= 0) & (values <= 1)).all())
    # without PRETRAINED the weights are random: other numbers, so the file above was really read
    torch.manual_seed(123)
    random_init = load_clip(f"open_clip:{tiny['config']}")
    assert "random weights" in random_init.name
    assert not torch.allclose(random_init.image_embeddings(images), image_emb, atol=1e-3)


def test_specs_parse_and_bad_ones_fail_before_loading(tiny, tmp_path):
    paper = parse_open_clip("open_clip:convnext_large_d_320:laion2b_s29b_b131k_ft_soup")
    assert (paper.arch, paper.pretrained) == ("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup")
    assert paper.local_pretrained() == "laion2b_s29b_b131k_ft_soup"  # a tag, left to open_clip
    assert parse_open_clip("openai/clip-vit-large-patch14") is None  # transformers' CLIPModel
    check_clip_spec(tiny["spec"])
    for spec, message in [("open_clip:", "name the architecture"),
                          (f"open_clip:{tmp_path / 'nope.json'}", "no such open_clip model config"),
                          (f"open_clip:{tiny['config']}:{tmp_path / 'nope.pt'}", "no such weights file"),
                          ("clip-folder-that-is-not-there", "not a folder, a hub id nor open_clip")]:
        with pytest.raises(DxError, match=message):
            check_clip_spec(spec)
    with pytest.raises(DxError, match="cannot load open_clip model 'open_clip:no-such-arch'"):
        load_clip("open_clip:no-such-arch")


def test_a_missing_open_clip_names_the_extra(tiny, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed: import fails
    with pytest.raises(DxError, match=r'needs open_clip: pip install "dxcli\[clip\]"'):
        load_clip(tiny["spec"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": None, "responses": [ANSWER]}) + "\n")
    result = CliRunner().invoke(app, ["eval", "rewards", str(rows), "--clip", tiny["spec"]])
    assert result.exit_code == 1
    assert 'needs open_clip: pip install "dxcli[clip]"' in " ".join(result.output.split())


def test_dx_eval_rewards_scores_vcr_with_open_clip(tiny, toy, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": f"q{i}", "image": image, "text": ANSWER}) + "\n"
                               for i, image in enumerate(["toy/test/real/000.png", "toy/test/fake/000.png"])))
    result = CliRunner().invoke(app, ["eval", "rewards", str(answers), "--images", str(toy["data"]),
                                      "--clip", tiny["spec"], "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    rows = json.loads(result.stdout)
    vcr = [[p["vcr"] for p in row["responses"][0]["paragraphs"]] for row in rows]
    assert all(v is not None and 0.0 <= v <= 1.0 for values in vcr for v in values)
    assert vcr[0] != vcr[1]  # the same text scores differently against different images


def test_a_prpo_step_uses_open_clip_for_vcr(tiny, toy, tmp_path):
    from dxcli.jobs.stages import run_prpo_stage

    sets = ["hardware.num_workers=0", "train.log_every=1", "train.max_steps=1", "prpo.max_new_tokens=8",
            f"prpo.clip={tiny['spec']}"]
    run_prpo_stage(out=tmp_path / "rl", resolved=config.resolve("cpu-tiny", sets), model=str(toy["model"]),
                   data=toy["data"], say=quiet)
    row, = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= row["vcr"] <= 1.0
    assert row["zero_advantage_share"] < 1.0  # VCR gives the one-paragraph toy answers a signal


# ---------------------------------------------------------------- the paper's CLIP in h200x8

PAPER_CLIP = "open_clip:convnext_large_d_320:laion2b_s29b_b131k_ft_soup"
PAPER_REPO = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, as on a machine that never fetched the CLIP."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    return cache


def test_h200x8_sets_the_papers_clip_and_plans_it():
    shown = CliRunner().invoke(app, ["profiles", "show", "h200x8"])
    row, = [line for line in shown.output.splitlines() if "prpo.clip " in line]
    assert shown.exit_code == 0 and "'open_clip:convnext_large_d" in row and "profile h200x8" in row  # 80 columns
    assert config.resolve("h200x8").config.prpo.clip == PAPER_CLIP
    plan = CliRunner().invoke(app, ["profiles", "show", "h200x8", "--memory", "--stage", "prpo"], terminal_width=300)
    assert plan.exit_code == 0, plan.output
    row, = [line for line in plan.output.splitlines() if "CLIP (VCR)" in line]
    assert "1.31" in row and "351.8M" in row  # 351,772,609 parameters x 4 B (fp32)


def test_the_shipped_clip_count_is_open_clips_model(tiny):
    """The planner's count (memory_shapes.OPEN_CLIP_PARAMS, arithmetic in its comment) against the
    model open_clip builds from its config, on the meta device; an unknown arch is built there too."""
    from dxcli.jobs.memory_shapes import OPEN_CLIP_PARAMS, clip_parameters

    with torch.device("meta"):
        model = open_clip.create_model("convnext_large_d_320", pretrained=None, device="meta")
    assert sum(p.numel() for p in model.parameters()) == OPEN_CLIP_PARAMS["convnext_large_d_320"] == 351_772_609
    assert clip_parameters(PAPER_CLIP)[0] == 351_772_609
    built = open_clip.create_model(tiny["config"].stem, pretrained=None)
    assert clip_parameters(tiny["spec"])[0] == sum(p.numel() for p in built.parameters())


def test_a_missing_clip_fails_in_one_line_before_any_model_loads(empty_hub_cache, tmp_path, monkeypatch):
    from dxcli.jobs import prepare, stages

    def loads(*args, **kwargs):
        raise AssertionError("a model was loaded or a worker launched before the CLIP check")

    for module, name in ((stages, "launch"), (prepare, "build_model"), (stages, "resolve_model_path")):
        monkeypatch.setattr(module, name, loads)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "prpo", "--profile", "h200x8", "--model", str(tmp_path / "sft"),
                                      "--data", str(tmp_path / "data"), "--out", str(out)], terminal_width=1000)
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert f"hf download {PAPER_REPO} open_clip_pytorch_model.bin" in message
    assert str(empty_hub_cache) in message and "model.download=true" in message
    assert not out.exists()  # refused before the run folder was written
    with pytest.raises(DxError) as info:
        check_clip_spec(PAPER_CLIP)
    assert "\n" not in str(info.value)


def test_a_cached_clip_passes_and_download_fetches_it_once(empty_hub_cache, monkeypatch):
    from open_clip import pretrained as registry

    fetched = []
    monkeypatch.setattr(registry, "download_pretrained", lambda cfg, **kw: fetched.append(cfg["hf_hub"]) or "x")
    check_clip_spec(PAPER_CLIP, download=True)  # model.download=true: the parent fetches it
    assert fetched == [f"{PAPER_REPO}/"]
    # as `hf download` leaves it: refs/main names a snapshot holding the file
    repo = empty_hub_cache / f"models--{PAPER_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    check_clip_spec(PAPER_CLIP)
    check_clip_spec(PAPER_CLIP, download=True)
    assert len(fetched) == 1  # cached: nothing fetched again
    with pytest.raises(DxError, match="open_clip knows no such weights"):
        check_clip_spec("open_clip:convnext_large_d_320:no_such_tag")
