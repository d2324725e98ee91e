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
