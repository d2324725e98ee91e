"""A LLaVA-1.5 as `model.llm` (the original instruct run starts from liuhaotian/llava-v1.5-7b): tiny
fixtures in LLaVA's own format and in transformers' LlavaForConditionalGeneration format give dx their
language model, and their projector only when it fits the tower, and start an instruct run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dxcli import config
from dxcli.base import template
from dxcli.config import ModelConfig
from dxcli.model.checkpoint import load_checkpoint
from dxcli.model.compose import compose
from helpers_images import make_tree
from helpers_original import llama_config, llama_tokenizer, original_state, write_original

ATTO_WIDTH = 320  # convnext_atto's last width: the tower's image features


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """LLaVA-1.5 in the original format (its projector takes 320-wide features: it fits the tower)
    and in the llava-hf format (24-wide CLIP ViT features: it does not), a timm tower file, a tree."""
    import timm
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("llava15")
    tokenizer = llama_tokenizer()
    state, cfg = original_state(tokenizer, with_head=False, tower_width=ATTO_WIDTH)
    write_original(root / "original", state, cfg, tokenizer, layout="bin", side_files=False)

    hf_tokenizer = llama_tokenizer()
    hf_tokenizer.add_tokens(["<image>"], special_tokens=True)  # llava-hf's tokenizers hold <image> (and pad the vocab)
    torch.manual_seed(3)
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14),
        text_config=llama_config(len(hf_tokenizer) + 2),
        image_token_index=hf_tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu"))
    llava.save_pretrained(root / "llava-hf")
    hf_tokenizer.save_pretrained(root / "llava-hf")

    save_file(timm.create_model("convnext_atto", pretrained=False).state_dict(), str(root / "atto.safetensors"))
    make_tree(root / "data", n=2, domains=("alpha",))
    return {"root": root, "state": state, "llava": llava}


def settings(parts, llm: str) -> list[str]:
    return ["model.preset=compose", f"model.llm={parts['root'] / llm}", "model.vision=convnext_atto",
            f"model.vision_weights={parts['root'] / 'atto.safetensors'}", "model.image_size=64", "model.head_hidden=16"]


def model_config(parts, llm: str) -> ModelConfig:
    return config.resolve(None, settings(parts, llm)).config.model


def test_the_original_format_gives_its_llm_and_its_fitting_projector(parts):
    bundle = compose(model_config(parts, "original"))
    state, ours = parts["state"], bundle.model.state_dict()
    rows = state["model.embed_tokens.weight"].shape[0]
    for key, tensor in state.items():
        if key.startswith(("model.layers.", "model.norm.", "model.embed_tokens.", "lm_head.")):
            mine = ours[key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key]
            grown = key.endswith(("embed_tokens.weight", "lm_head.weight"))  # + the <image> row
            assert torch.equal(mine[:rows] if grown else mine, tensor), key
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        for part in ("weight", "bias"):
            assert torch.equal(ours[f"model.multi_modal_projector.{name}.{part}"],
                               state[f"model.mm_projector.{index}.{part}"])
    assert any("starts from its projector" in note for note in bundle.notes)
    assert bundle.tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN) == rows  # added after the LLaVA's vocabulary


def test_the_llava_hf_format_gives_its_llm_and_says_the_projector_is_fresh(parts):
    bundle = compose(model_config(parts, "llava-hf"))
    llava, ours = parts["llava"], bundle.model
    for key, tensor in llava.model.language_model.state_dict().items():
        assert torch.equal(ours.model.language_model.state_dict()[key], tensor), key
    assert torch.equal(ours.lm_head.weight, llava.lm_head.weight)
    note = next(note for note in bundle.notes if "projector" in note)
    assert "24-wide" in note and f"gives {ATTO_WIDTH}" in note and "fresh projector" in note
    assert not torch.equal(ours.model.multi_modal_projector.linear_2.weight,
                           llava.model.multi_modal_projector.linear_2.weight)
    assert ours.config.image_token_id == bundle.tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN)


@pytest.mark.parametrize("llm", ["original", "llava-hf"])
def test_a_llava15_starts_an_instruct_run(parts, llm, tmp_path):
    from dxcli.jobs.stages import run_sft_stage

    sets = [*settings(parts, llm), "train.max_steps=1", "hardware.num_workers=0", "train.save_every=0"]
    model = run_sft_stage("instruct", out=tmp_path / "run", data=parts["root"] / "data", say=lambda *_: None,
                          resolved=config.resolve("cpu-tiny", sets))
    bundle = load_checkpoint(model)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().strip()
    assert bundle.model.config.text_config.hidden_size == 32
