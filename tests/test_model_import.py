"""`dx model import`: tiny checkpoints written in the original code's format (tests/helpers_original.py)
become dx models that compute what the original computes: the head's probability (with its clamp),
the greedy text (image tokens spliced at `<image>`), the prompt's token ids and the preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dxcli.base import template
from dxcli.base.errors import DxError, UsageError
from dxcli.config import resolve
from dxcli.jobs.import_model import import_model
from dxcli.model.checkpoint import load_checkpoint, load_image_side
from dxcli.model.generate import encode_images, generate
from helpers_original import (TOWER, llama_tokenizer, original_greedy, original_head_prob, original_prompt_ids,
                              original_state, write_original)

SETS = ["model.image_size=64"]  # the tiny tower's 2 x 2 image tokens


def config(*sets: str):
    return resolve(None, [*SETS, *sets]).config


def picture(seed: int = 0, size: tuple[int, int] = (70, 90)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An original DX-LLaVA in sharded .bin with its side files, and its import."""
    root = tmp_path_factory.mktemp("original")
    tokenizer = llama_tokenizer()
    state, cfg = original_state(tokenizer)
    src = write_original(root / "src", state, cfg, tokenizer, layout="bin")
    out = import_model(src, root / "dx", config()).out
    return {"root": root, "src": src, "out": out, "state": state, "config": cfg, "tokenizer": tokenizer}


def test_the_head_probability_is_the_originals(original):
    bundle = load_checkpoint(original["out"])
    images = [picture(0), picture(1, (90, 60))]
    pixels = bundle.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    expected = original_head_prob(original["state"], pixels)
    _, probs = encode_images(bundle, images)
    assert torch.allclose(torch.tensor(probs), expected, atol=1e-5)
    assert (original_head_prob(original["state"], pixels, clamp=None) - expected).abs().max() > 1e-3  # the clamp acts
    assert bundle.model.config.head_clamp == 10.0
    head_only = load_image_side(original["out"])  # dx detect --no-reasoning's loader
    features = head_only.model.image_features(pixels)
    assert torch.allclose(torch.sigmoid(head_only.model.head_logits_from_features(features)), expected, atol=1e-5)


def test_the_prompt_ids_and_greedy_text_are_the_originals(original):
    bundle, tokenizer = load_checkpoint(original["out"]), original["tokenizer"]
    prompt = template.prompt(template.DEFAULT_QUESTION)
    image_id = bundle.model.config.image_token_id
    expected_ids = [image_id if i == -200 else i for i in original_prompt_ids(tokenizer, prompt)]
    assert bundle.tokenizer(prompt).input_ids == expected_ids  # the `▁` the original puts after the image

    image = picture(2)
    pixels = bundle.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    expected = original_greedy(original["state"], original["config"], tokenizer, pixels, prompt, steps=12)
    out = generate(bundle, [image], [template.DEFAULT_QUESTION], max_new_tokens=12)
    assert out.token_ids[0] == expected
    assert out.texts[0] == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_plain_transformers_opens_the_import(original):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(original["out"])
    model = AutoModelForImageTextToText.from_pretrained(original["out"]).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Real or fake?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == template.prompt("Real or fake?")
    image = picture(3)
    inputs = processor(images=image, text=text, return_tensors="pt")
    ids = original_prompt_ids(original["tokenizer"], text)
    cut = ids.index(-200)
    assert inputs["input_ids"][0].tolist() == ids[:cut] + [model.config.image_token_id] * 4 + ids[cut + 1:]
    expected = original_greedy(original["state"], original["config"], original["tokenizer"],
                               inputs["pixel_values"], text, steps=8)
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert new.tolist() == expected


def test_pad_preprocessing_is_recorded_and_honoured(original, tmp_path):
    out = import_model(original["src"], tmp_path / "padded", config(), pad=True).out
    bundle = load_checkpoint(out)
    assert bundle.model.config.image_aspect_ratio == "pad"
    cropped = load_checkpoint(original["out"]).processor.image_processor
    image = picture(4, (40, 90))  # wide: padded above and below with the mean colour, then resized
    mean = tuple(int(255 * m) for m in cropped.image_mean)
    square = Image.new("RGB", (90, 90), mean)
    square.paste(image, (0, (90 - 40) // 2))
    pads = bundle.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(pads, cropped(images=[square], return_tensors="pt")["pixel_values"])
    assert not torch.equal(pads, cropped(images=[image], return_tensors="pt")["pixel_values"])

    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "image_aspect_ratio": "crop"}))
    with pytest.raises(DxError, match="must agree"):
        load_checkpoint(out)


def test_the_tower_from_a_side_file_or_from_model_vision_weights(original, tmp_path):
    state, cfg, tokenizer = original["state"], original["config"], original["tokenizer"]
    side_only = write_original(tmp_path / "side", state, cfg, tokenizer, tower_in_main=False)
    tower = load_checkpoint(import_model(side_only, tmp_path / "a", config()).out).model.model.vision_tower
    expected = {k.split("visual.trunk.", 1)[1]: t for k, t in state.items() if "visual.trunk." in k}
    assert all(torch.equal(tower.timm_model.state_dict()[k], t) for k, t in expected.items())

    bare = write_original(tmp_path / "bare", state, cfg, tokenizer, side_files=False, tower_in_main=False)
    with pytest.raises(DxError, match="model.vision_weights"):
        import_model(bare, tmp_path / "b", config())
    open_clip_file = tmp_path / "open_clip_pytorch_model.bin"  # an open_clip CLIP's state dict
    torch.save({k.removeprefix(TOWER): t for k, t in state.items() if k.startswith(TOWER)}, open_clip_file)
    with pytest.raises(DxError, match="holds its own tower"):
        import_model(original["src"], tmp_path / "c", config(f"model.vision_weights={open_clip_file}"))
    out = import_model(bare, tmp_path / "d", config(f"model.vision_weights={open_clip_file}")).out
    tower = load_checkpoint(out).model.model.vision_tower
    assert all(torch.equal(tower.timm_model.state_dict()[k], t) for k, t in expected.items())


def test_what_cannot_be_imported_is_refused_in_one_line(original, tmp_path):
    state, cfg, tokenizer = original["state"], original["config"], original["tokenizer"]
    with pytest.raises(UsageError, match="no such file"):
        import_model(tmp_path / "absent", tmp_path / "o1", config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DxError, match="no config.json"):
        import_model(tmp_path / "empty", tmp_path / "o2", config())
    with pytest.raises(DxError, match="already a dx model"):
        import_model(original["out"], tmp_path / "o3", config())
    plain = write_original(tmp_path / "plain", state, {**cfg, "model_type": "llama"}, tokenizer)
    with pytest.raises(DxError, match="'llama' model: neither"):
        import_model(plain, tmp_path / "o4", config())
    linear = write_original(tmp_path / "linear", state, {**cfg, "mm_projector_type": "linear"}, tokenizer)
    with pytest.raises(DxError, match="'linear' projector"):
        import_model(linear, tmp_path / "o8", config())
    llava15_state, llava15_cfg = original_state(tokenizer, with_head=False, tower_width=24)
    llava15 = write_original(tmp_path / "llava15", llava15_state, llava15_cfg, tokenizer)
    with pytest.raises(DxError, match="no binary head.*model.llm="):
        import_model(llava15, tmp_path / "o5", config())
    stray = write_original(tmp_path / "stray", {**state, "model.image_newline": torch.zeros(32)}, cfg, tokenizer)
    with pytest.raises(DxError, match="fit nowhere.*model.image_newline"):
        import_model(stray, tmp_path / "o6", config())
    cut = write_original(tmp_path / "cut", {k: t for k, t in state.items() if "layers.1.mlp.up" not in k}, cfg,
                         tokenizer)
    with pytest.raises(DxError, match=r"incomplete.*model\.layers\.1\.mlp\.up_proj"):  # named as the original does
        import_model(cut, tmp_path / "o7", config())


def test_a_pickle_that_runs_code_is_never_loaded(original, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(original["src"], src)
    torch.save({"model.mm_projector.0.weight": torch.zeros(1), "payload": Image.new("RGB", (1, 1))},
               src / "mm_projector.bin")  # an arbitrary object: unpickling it would import and call code
    with pytest.raises(DxError, match="weights_only=True"):
        import_model(src, tmp_path / "out", config())


def test_out_is_never_overwritten_without_force(original, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="--force"):
        import_model(original["src"], out, config())
    import_model(original["src"], out, config(), force=True)
    assert (out / "keep.txt").read_text() == "mine" and load_checkpoint(out).model.config.head_clamp == 10.0


def test_other_commands_say_to_import_first_and_the_cli_imports(original, tmp_path):
    from dxcli.cli.main import app

    with pytest.raises(DxError, match="dx model import"):
        load_checkpoint(original["src"])
    runner = CliRunner()
    picture().save(tmp_path / "x.png")
    result = runner.invoke(app, ["detect", str(tmp_path / "x.png"), "--model", str(original["src"])])
    assert result.exit_code != 0 and "import it first" in result.output
    result = runner.invoke(app, ["model", "import", str(original["src"]), "--out", str(tmp_path / "cli"),
                                 "--set", "model.image_size=64"])
    assert result.exit_code == 0, result.output
    assert "imported" in result.output and load_checkpoint(tmp_path / "cli").model.config.head_clamp == 10.0
    result = runner.invoke(app, ["model", "import", str(original["src"]), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and [line for line in result.output.splitlines() if line.startswith("error:")]


def test_the_import_detects_evaluates_and_continues_with_prpo(original, tmp_path):
    """What the original's users could not do: detect with their model, evaluate it, continue it with
    PRPO. The imported folder goes through each command; PRPO's saved model keeps the clamp."""
    from dxcli.cli.main import app
    from helpers_images import make_tree

    runner, tree = CliRunner(), tmp_path / "tree"
    make_tree(tree, n=2, domains=("alpha",))
    image = next((tree / "alpha" / "test" / "fake").iterdir())
    model = str(original["out"])
    result = runner.invoke(app, ["detect", str(image), "--model", model, "--json", "--set", "eval.max_new_tokens=8"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.strip().splitlines()[-1])
    assert 0.0 <= row["head_prob"] <= 1.0 and row["error"] is None
    questions = tmp_path / "q.jsonl"
    assert runner.invoke(app, ["questions", "gen", str(tree), "--out", str(questions), "--split", "test"]).exit_code == 0
    answers = tmp_path / "answers.jsonl"
    result = runner.invoke(app, ["eval", "infer", "--model", model, "--questions", str(questions), "--images", str(tree),
                                 "--out", str(answers), "--set", "eval.max_new_tokens=8"])
    assert result.exit_code == 0, result.output
    assert len(answers.read_text().splitlines()) == len(questions.read_text().splitlines())
    run = tmp_path / "prpo"
    result = runner.invoke(app, ["train", "prpo", "--data", str(tree), "--model", model, "--out", str(run),
                                 "--set", "train.max_steps=1", "--set", "prpo.max_new_tokens=8",
                                 "--set", "prpo.guard=false"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "model").model.config.head_clamp == 10.0
