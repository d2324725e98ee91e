"""open_clip weights for the DX-LLaVA tower (`model.vision_weights`): a random open_clip model with
a tiny timm ConvNeXt trunk, saved as open_clip saves it, gives the tower exactly its `visual.trunk`
features; the same file scores VCR through `--clip open_clip:ARCH:FILE`; hub ids come from the
local cache only; a trunk of another shape, a ViT CLIP, pickled code and a cache miss fail in one line.
Nothing is downloaded: every model is built from a config here."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dxcli.base.errors import DxError
from dxcli.config import ModelConfig
from dxcli.model.build import CLIP_MEAN, CLIP_STD, train_tokenizer
from dxcli.model.compose import compose
from dxcli.model.vision_weights import (check_tower_arch, load_tower, timm_state_from_open_clip, timm_tower_state,
                                        vision_state_dict)
from dxcli.rl.clip import load_clip
from helpers_rl import save_tiny_open_clip, toy_image

# open_clip's convnext_large_d_320 config with convnext_atto as its trunk and tiny text: a few MB
TINY_CONVNEXT_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "mlp", "timm_drop": 0.0, "timm_drop_path": 0.0, "image_size": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
PAPER_REPO = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
PAPER_CLIP = "open_clip:convnext_large_d_320:laion2b_s29b_b131k_ft_soup"
PAPER_TOWER = ModelConfig().vision  # dx's default: convnext_large_mlp.clip_laion2b_ft_soup_320


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict:
    """A random open_clip model from its own config, saved as open_clip saves it: `.bin` beside its
    hub config in one folder, `.safetensors` in another; and a tiny Llama folder to compose with."""
    root = tmp_path_factory.mktemp("open_clip_tower")
    config = root / "dx-tiny-convnext-clip.json"
    config.write_text(json.dumps(TINY_CONVNEXT_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(7)
    model, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=None)
    model.eval()
    repo, safe = root / "repo", root / "safe"
    for folder in (repo, safe):
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONVNEXT_CLIP}))
    torch.save(model.state_dict(), repo / "open_clip_pytorch_model.bin")
    save_file(model.state_dict(), str(safe / "open_clip_model.safetensors"))
    return {"model": model, "preprocess": preprocess, "config": config, "bin": repo / "open_clip_pytorch_model.bin", "repo": repo,
            "safe": safe, "llm": _tiny_llm(root / "llm")}


def _tiny_llm(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(["skin texture looks real", "edges look fake"], 300)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compose_cfg(clip: dict, weights: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(preset="compose", vision="convnext_atto", vision_weights=weights, llm=str(clip["llm"]),
                      image_size=64, head_hidden=16)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, and no network: a connection attempt fails the test."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"network access: {a}"))
    return cache


def test_the_tower_gives_open_clips_trunk_features_from_every_form_of_the_file(clip):
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = clip["model"].visual.trunk.forward_features(pixels)
    spec = f"open_clip:{clip['config']}:{clip['bin']}"  # the very spec --clip takes
    for weights in (str(clip["bin"]), spec):
        bundle = compose(compose_cfg(clip, weights))
        with torch.no_grad():
            ours = bundle.model.model.vision_tower(pixel_values=pixels).last_hidden_state
        assert ours.shape == expected.shape == (2, 320, 2, 2)
        assert torch.allclose(ours, expected, atol=1e-5), weights
    # open_clip's folders, .bin or .safetensors, give the same tensors
    composed = bundle.model.model.vision_tower.timm_model.state_dict()
    for folder in (clip["repo"], clip["safe"]):
        state, _ = vision_state_dict("convnext_atto", str(folder), 64)
        assert all(torch.equal(state[key], tensor) for key, tensor in composed.items()), folder
    # dx's processor normalises as open_clip's transform does (OpenAI CLIP mean/std)
    normalize = clip["preprocess"].transforms[-1]
    assert bundle.processor.image_processor.image_mean == pytest.approx(list(normalize.mean))
    assert bundle.processor.image_processor.image_std == pytest.approx(list(normalize.std))


def test_the_same_file_scores_vcr(clip):
    scorer = load_clip(f"open_clip:{clip['config']}:{clip['bin']}")
    images = [toy_image("real"), toy_image("fake", seed=1)]
    embeddings = scorer.image_embeddings(images)
    with torch.no_grad():
        pixels = torch.stack([clip["preprocess"](im) for im in images])
        expected = clip["model"].encode_image(pixels, normalize=True)
    assert torch.allclose(embeddings, expected, atol=1e-5)
    values = scorer.vcr(embeddings[0], ["skin texture", "lighting"])
    assert values.shape == (2,) and bool(((values >= 0) & (values <= 1)).all())


def test_a_hub_repo_loads_from_the_cache_and_a_missing_one_names_the_download(clip, empty_hub_cache):
    # as `hf download` leaves a repo: refs/main names a snapshot holding its files
    repo = empty_hub_cache / "models--dx-test--tiny-convnext-clip"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        (snapshot / name).write_bytes((clip["repo"] / name).read_bytes())
    state, notes = vision_state_dict("convnext_atto", "hf-hub:dx-test/tiny-convnext-clip", 64)
    trunk = clip["model"].visual.trunk.state_dict()
    assert notes == [] and all(torch.equal(state[key], tensor) for key, tensor in trunk.items())

    for weights, fetch in ((f"hf-hub:{PAPER_REPO}", f"hf download {PAPER_REPO} open_clip_pytorch_model.bin "
                                                    "open_clip_config.json"),
                           (PAPER_CLIP, f"hf download {PAPER_REPO} open_clip_pytorch_model.bin")):
        with pytest.raises(DxError) as info:
            compose(compose_cfg(clip, weights, vision=PAPER_TOWER, image_size=320))
        message = str(info.value)
        assert fetch in message and str(empty_hub_cache) in message and "model.download=true" in message
        assert "\n" not in message


def test_download_fetches_a_missing_repo_once(clip, empty_hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    asked = []

    def fetch(repo: str, name: str) -> str:  # the repo has the .bin and no .safetensors twin
        asked.append(name)
        if not (clip["repo"] / name).is_file():
            raise EntryNotFoundError(f"{repo} has no {name}")
        return str(clip["repo"] / name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    state, _ = vision_state_dict("convnext_atto", "hf-hub:dx-test/elsewhere", 64, download=True)
    assert asked == ["open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    assert torch.equal(state["stem.0.weight"], clip["model"].visual.trunk.stem[0].weight)


def test_the_papers_clip_is_the_default_towers_trunk():
    """open_clip's convnext_large_d_320 (on the meta device) loads into dx's default tower with no
    tensor missing or misshapen; same 320 px, same normalisation; another tower is refused."""
    import timm

    with torch.device("meta"):
        paper = open_clip.create_model("convnext_large_d_320", pretrained=None, device="meta")
        tower = timm.create_model(PAPER_TOWER, pretrained=False, num_classes=0)
    vision_cfg = open_clip.get_model_config("convnext_large_d_320")["vision_cfg"]
    check_tower_arch(PAPER_TOWER, vision_cfg, PAPER_CLIP)
    state = timm_tower_state(paper.state_dict(), PAPER_CLIP)
    assert state.keys() - timm_state_from_open_clip(paper.state_dict()).keys() == {  # open_clip's MLP, first layer
        "head.pre_logits.fc.weight", "head.pre_logits.fc.bias"}
    assert load_tower(tower, state, PAPER_CLIP, PAPER_TOWER) == []  # every tensor used, none missing
    assert vision_cfg["image_size"] == ModelConfig().image_size == 320
    paper_cfg = open_clip.get_pretrained_cfg("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup")
    assert (paper_cfg["mean"], paper_cfg["std"]) == (CLIP_MEAN, CLIP_STD)
    with pytest.raises(DxError, match=r"wraps timm's convnext_large but model.vision is convnext_base; "
                                      r"set --set model.vision=convnext_large or convnext_large_mlp$"):
        check_tower_arch("convnext_base", vision_cfg, PAPER_CLIP)


def test_bad_open_clip_weights_fail_in_one_line(clip, tmp_path):
    spec = f"open_clip:{clip['config']}:{clip['bin']}"
    lone = tmp_path / "weights.bin"
    lone.write_bytes(clip["bin"].read_bytes())
    cases = [
        (compose_cfg(clip, spec, vision="convnext_femto"), "wraps timm's convnext_atto but model.vision is convnext_femto; set --set model.vision=convnext_atto$"),
        (compose_cfg(clip, str(lone), vision="convnext_femto"),  # no config beside it names the trunk: shapes do
         r"do not fit convnext_femto: 0 missing \(\), \d+ of other shapes \(stem.0.weight 40x3x4x4 in the file, "
         r"48x3x4x4 in the tower"),
        (compose_cfg(clip, f"open_clip:{clip['config']}"), "name its weights, open_clip:ARCH:TAG_OR_FILE"),
        (compose_cfg(clip, f"open_clip:{clip['config']}:{tmp_path / 'nope.bin'}"), "no such weights file"),
    ]
    vit_config, vit_weights = save_tiny_open_clip(tmp_path / "vit")
    cases.append((compose_cfg(clip, f"open_clip:{vit_config}:{vit_weights}"), "open_clip's own vision transformer"))
    cases.append((compose_cfg(clip, str(vit_weights)), r"open_clip's own vision transformer \(visual\.\*\)"))
    torch.save({"weights": Pickled()}, tmp_path / "code.bin")
    cases.append((compose_cfg(clip, str(tmp_path / "code.bin")), "hold more than tensors"))
    for cfg, message in cases:
        with pytest.raises(DxError, match=message) as info:
            compose(cfg)
        assert "\n" not in str(info.value)


def test_another_image_size_loads_with_a_note(clip):
    state, notes = vision_state_dict("convnext_atto", f"open_clip:{clip['config']}:{clip['bin']}", 128)
    assert torch.equal(state["stem.0.weight"], clip["model"].visual.trunk.stem[0].weight)
    note, = notes
    assert "open_clip ran this tower at 64 px, model.image_size is 128" in note


class Pickled:
    """Not a tensor: torch.load(weights_only=True) refuses to rebuild it."""


def test_a_composed_run_finds_its_sources_in_the_parent_before_any_worker(empty_hub_cache, tmp_path):
    """Missing open_clip weights, or an LLM hub id not in the cache, stop `dx train align` in one
    line before any worker is launched (no worker log, no rank-by-rank repeats)."""
    from typer.testing import CliRunner

    from dxcli.cli.main import app
    from helpers_images import make_tree

    make_tree(tmp_path / "data", n=2, domains=("alpha",))
    compose_keys = ["model.preset=compose", "model.vision=convnext_atto", "model.image_size=64"]
    cases = {
        "open_clip:convnext_large_d_320:laion2b_s29b_b131k_ft_soup": "hf download",  # tag not cached
        str(tmp_path / "nowhere.bin"): "vision weights not found",
    }
    for number, (weights, expected) in enumerate(cases.items()):
        out = tmp_path / f"run{number}"
        sets = [*compose_keys, f"model.vision_weights={weights}", f"model.llm={tmp_path}"]
        result = CliRunner().invoke(app, ["train", "align", "--data", str(tmp_path / "data"), "--out", str(out),
                                          *[arg for key in sets for arg in ("--set", key)]])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert not list(out.glob("**/worker*.log")) and "Traceback" not in result.output
    sets = [*compose_keys, "model.llm=some-org/not-cached-llm"]
    result = CliRunner().invoke(app, ["train", "align", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                                      *[arg for key in sets for arg in ("--set", key)]])
    assert result.exit_code == 1 and "not in the Hugging Face cache" in result.output, result.output
