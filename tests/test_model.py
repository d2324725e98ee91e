"""DX-LLaVA model module: tiny preset, processor, generation paths, freezing, checkpoints, composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dxcli.base import template
from dxcli.config import ModelConfig
from dxcli.base.errors import DxError
from dxcli.model.build import build_tiny, image_token_count
from dxcli.model.compose import compose
from dxcli.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from dxcli.model.dxllava import DxLlavaForConditionalGeneration

TEXTS = [
    "**Skin Texture**: natural pores and realistic texture.\n\n### Answer: real",
    "**Edges**: blurry edges, warping and synthetic artifacts.\n\n### Answer: fake",
] * 5


def tiny_cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(preset="tiny", image_size=64, head_hidden=32)
    cfg.tiny.vision_depths = [1, 1, 1, 1]
    cfg.tiny.vision_dims = [8, 16, 32, 64]
    cfg.tiny.hidden_size = 64
    cfg.tiny.intermediate_size = 128
    cfg.tiny.num_heads = 4
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(70, 90), (100, 64), (64, 64)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def bundle():
    return build_tiny(tiny_cfg(), TEXTS)


def batch(bundle, side: str = "left"):
    bundle.tokenizer.padding_side = side
    prompts = [template.prompt(template.DEFAULT_QUESTION), template.prompt("Real or fake?")]
    return bundle.processor(images=images(2), text=prompts, padding=True, return_tensors="pt")


def test_tiny_is_deterministic_and_offline():
    a, b = build_tiny(tiny_cfg(), TEXTS), build_tiny(tiny_cfg(), TEXTS)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert a.model.config.vision_config.hidden_size == 64  # last ConvNeXt width, set by hand
    with pytest.raises(DxError, match="texts"):
        build_model(tiny_cfg())


def test_generation_never_emits_image_token():
    bundle = build_tiny(tiny_cfg(), TEXTS)
    model, image_id = bundle.model.eval(), bundle.model.config.image_token_id
    with torch.no_grad():
        model.lm_head.weight[image_id] += 5.0  # make `<image>` the favourite next token
        enc = bundle.processor(images=images(1), text=[template.prompt("x")], return_tensors="pt")
        new = model.generate(**enc, max_new_tokens=4, do_sample=False)[:, enc.input_ids.shape[1]:]
        assert model(**enc).logits[0, -1].argmax() == image_id
    assert not (new == image_id).any()


def test_tokenizer_is_llama_like(bundle):
    tok = bundle.tokenizer
    ids = tok(template.prompt("hi") + " real</s>").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert tok.pad_token == "<pad>" and tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)
    assert tok.decode(tok("### Answer: fake").input_ids, skip_special_tokens=True) == "### Answer: fake"


def test_processor_expands_image_and_pads_left(bundle):
    enc = batch(bundle, "left")
    n = image_token_count(bundle.processor)
    assert n == (64 // 32) ** 2 == image_token_count(tiny_cfg()) == image_token_count(bundle.model.config)
    image_id = bundle.model.config.image_token_id
    assert (enc.input_ids == image_id).sum(1).tolist() == [n, n]
    assert enc.pixel_values.shape == (2, 3, 64, 64)
    short = int(enc.attention_mask.sum(1).argmin())
    assert enc.attention_mask[short, 0] == 0 and enc.input_ids[short, 0] == bundle.tokenizer.pad_token_id
    assert enc.attention_mask[short, -1] == 1


def test_forward_losses_and_head(bundle):
    model = bundle.model.eval()
    enc = batch(bundle, "right")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    out = model(**enc, labels=labels, binary_labels=torch.tensor([1, 0]))
    assert out.logits.shape[:2] == enc.input_ids.shape and out.loss.item() > 0
    assert out.head_logits.shape == (2,)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.head_logits, torch.tensor([1.0, 0.0]))
    assert torch.allclose(out.bin_loss, expected)
    features = model.image_features(enc.pixel_values)
    assert features.shape == (2, image_token_count(bundle.processor), model.config.text_config.hidden_size)
    assert torch.allclose(model.head_logits_from_features(features), out.head_logits)
    pooled = model.binary_head(features.mean(dim=1)).squeeze(-1)  # METHOD.md §2: mean of projected tokens
    assert torch.allclose(pooled, out.head_logits)
    assert model(input_ids=enc.input_ids, pixel_values=enc.pixel_values).bin_loss is None


def test_generate_from_embeds_matches_pixels(bundle):
    model = bundle.model.eval()
    enc = batch(bundle, "left")
    with torch.no_grad():
        direct = model.generate(**enc, max_new_tokens=6, do_sample=False)
        features = model.image_features(enc.pixel_values)
        embeds = model.prompt_embeds(enc.input_ids, enc.attention_mask, image_features=features)
        reused = model.generate(inputs_embeds=embeds, attention_mask=enc.attention_mask,
                                max_new_tokens=6, do_sample=False)
        grouped = model.generate(inputs_embeds=embeds, attention_mask=enc.attention_mask, max_new_tokens=4,
                                 do_sample=True, num_return_sequences=3)
    prompt_len = enc.input_ids.shape[1]
    assert torch.equal(direct[:, prompt_len:], reused)  # inputs_embeds -> only new tokens come back
    assert grouped.shape[0] == 6


def test_frozen_vision_stays_in_eval(bundle):
    model = bundle.model
    model.freeze(vision=True, llm=True, projector=False, head=False)  # align
    model.train()
    assert model.training and model.model.multi_modal_projector.training
    assert not any(m.training for m in model.model.vision_tower.modules())
    trainable = {n.split(".")[0] if n.startswith("binary_head") else n.split(".")[1]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"multi_modal_projector", "binary_head"}

    model.freeze(vision=False, llm=False, projector=False, head=False)  # cpu-tiny instruct
    model.train()
    assert model.model.vision_tower.training
    timm_model = model.model.vision_tower.timm_model
    assert not any(p.requires_grad for p in timm_model.head.parameters())  # never reached
    assert all(p.requires_grad for p in timm_model.stages.parameters())
    model.freeze(vision=True, llm=False, projector=False, head=False)
    assert not model.model.vision_tower.training  # freezing switches it off at once
    model.eval()


def test_checkpoint_round_trip(bundle, tmp_path):
    model = bundle.model.eval()
    enc = batch(bundle, "right")
    save_checkpoint(bundle, tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("*.bin"))
    loaded = build_model(ModelConfig(path=str(tmp_path / "ckpt")))
    assert isinstance(loaded.model, DxLlavaForConditionalGeneration)
    with torch.no_grad():
        before, after = model(**enc), loaded.model.eval()(**enc)
    saved, reloaded = model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    # equal weights, but the loaded ones sit at other memory alignments (safetensors offsets): with
    # one CPU thread (as after a cpu-tiny run in this process) the head's matmul then takes another
    # SIMD path and may differ in the last bit
    assert torch.equal(before.logits, after.logits)
    assert torch.allclose(before.head_logits, after.head_logits, rtol=1e-5, atol=1e-9)
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    assert image_token_count(loaded.processor) == image_token_count(bundle.processor)
    again = loaded.processor(images=images(2), text=[template.prompt("a"), template.prompt("b c")],
                             padding=True, return_tensors="pt")
    assert torch.equal(again.pixel_values, bundle.processor(images=images(2), text=[template.prompt("a")] * 2,
                                                            padding=True, return_tensors="pt").pixel_values)


def test_bf16_round_trip_keeps_rope_in_fp32(tmp_path):
    bundle = build_tiny(tiny_cfg(), TEXTS, dtype=torch.bfloat16)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}
    assert bundle.model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    save_checkpoint(bundle, tmp_path)
    loaded = load_checkpoint(tmp_path)
    enc = batch(bundle, "right")
    with torch.no_grad():
        assert torch.equal(bundle.model.eval()(**enc).logits, loaded.model.eval()(**enc).logits)


def test_load_checkpoint_errors(bundle, tmp_path):
    with pytest.raises(DxError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DxError, match="not a dx checkpoint"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(bundle, tmp_path / "cut")
    tensors = load_file(str(tmp_path / "cut" / "model.safetensors"))
    del tensors["binary_head.0.weight"]
    save_file(tensors, str(tmp_path / "cut" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DxError, match="binary_head.0.weight"):
        load_checkpoint(tmp_path / "cut")


# ---------------------------------------------------------------- composition from local parts


def _plain_tokenizer():
    """A Llama-style tokenizer without `<image>` or pad, as a downloaded LLM would have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A saved tiny Llama folder and a saved timm convnext_atto state dict."""
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("parts")
    tokenizer = _plain_tokenizer()
    torch.manual_seed(1)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vision = timm.create_model("convnext_atto", pretrained=False)
    save_file(vision.state_dict(), str(root / "convnext_atto.safetensors"))
    return root


def compose_cfg(parts, **overrides) -> ModelConfig:
    cfg = ModelConfig(preset="compose", vision="convnext_atto", vision_weights=str(parts / "convnext_atto.safetensors"),
                      llm=str(parts / "llm"), image_size=64, head_hidden=16)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_compose_from_local_parts(parts):
    saved_llm = load_file(str(parts / "llm" / "model.safetensors"))
    saved_vision = load_file(str(parts / "convnext_atto.safetensors"))
    bundle = build_model(compose_cfg(parts))
    model, tok = bundle.model, bundle.tokenizer

    state = model.state_dict()
    old_vocab = saved_llm["model.embed_tokens.weight"].shape[0]
    for key, tensor in saved_llm.items():
        ours = state[key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key]
        assert torch.equal(ours[:old_vocab] if ours.shape != tensor.shape else ours, tensor), key
    for key, tensor in saved_vision.items():
        if not key.startswith("head.fc"):  # the classifier is not part of the tower
            assert torch.equal(state[f"model.vision_tower.timm_model.{key}"], tensor), key
    assert any("head.fc" in note for note in bundle.notes)  # unused tensors are reported

    assert tok.convert_tokens_to_ids("<image>") == old_vocab  # added, embeddings resized
    assert model.get_input_embeddings().num_embeddings == len(tok) == old_vocab + 1
    assert tok.pad_token == tok.unk_token
    assert model.config.vision_config.hidden_size == 320  # convnext_atto's last width
    enc = bundle.processor(images=images(1), text=[template.prompt("x")], return_tensors="pt")
    assert (enc.input_ids == model.config.image_token_id).sum() == 4
    out = model(**enc, labels=enc.input_ids, binary_labels=torch.tensor([1]))
    assert torch.isfinite(out.loss) and torch.isfinite(out.bin_loss)


def test_missing_llm_weight_fails_loudly(parts, tmp_path):
    import shutil

    broken = tmp_path / "llm"
    shutil.copytree(parts / "llm", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DxError, match=r"missing .*layers\.1\.mlp\.down_proj"):
        compose(compose_cfg(parts, llm=str(broken)))


def test_bad_vision_weights_fail_loudly(parts, tmp_path):
    tensors = load_file(str(parts / "convnext_atto.safetensors"))
    del tensors["stages.2.blocks.0.conv_dw.weight"]
    save_file(tensors, str(tmp_path / "v.safetensors"))
    with pytest.raises(DxError, match="stages.2.blocks.0.conv_dw.weight"):
        compose(compose_cfg(parts, vision_weights=str(tmp_path / "v.safetensors")))
    with pytest.raises(DxError, match="neither a local file"):
        compose(compose_cfg(parts, vision_weights=str(tmp_path / "absent.safetensors")))
    with pytest.raises(DxError, match="neither a local file"):
        compose(compose_cfg(parts, vision_weights="weights/absent.pth"))


def test_a_hub_id_missing_from_the_cache_fails_at_once_saying_what_to_do(monkeypatch, tmp_path):
    """Offline by default: no connection attempt, a one-line error naming the download command."""
    import socket

    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(DxError, match="hf download some-org/no-such-model"):
        compose(ModelConfig(llm="some-org/no-such-model"))
    assert attempts == []


def test_composition_loads_in_the_runs_dtype_with_its_attention(parts, monkeypatch):
    from transformers import AutoModelForCausalLM

    asked = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        asked.append(kwargs.get("dtype"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    bundle = build_model(compose_cfg(parts, attn_implementation="eager"), dtype=torch.bfloat16)
    assert asked == [torch.bfloat16]  # the LLM is read in bf16, never as a float32 copy first
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}
    assert bundle.model.config.text_config._attn_implementation == "eager"


def test_attention_kernel_is_applied_and_a_missing_one_is_one_line(tmp_path):
    import importlib.util

    from typer.testing import CliRunner

    from dxcli.cli.main import app

    bundle = build_model(tiny_cfg(attn_implementation="eager"), TEXTS)
    assert bundle.model.config.text_config._attn_implementation == "eager"
    save_checkpoint(bundle, tmp_path / "ckpt")
    for kernel in ("eager", "sdpa"):
        loaded = load_checkpoint(tmp_path / "ckpt", attn_implementation=kernel).model
        assert loaded.model.language_model.config._attn_implementation == kernel
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn is usable here")
    with pytest.raises(DxError, match="flash") as info:
        load_checkpoint(tmp_path / "ckpt", attn_implementation="flash_attention_2")
    assert "\n" not in str(info.value)
    out = tmp_path / "run"  # the CLI refuses it before reading data or loading anything
    result = CliRunner().invoke(app, ["train", "instruct", "--data", str(tmp_path / "absent"), "--out", str(out),
                                      "--set", "model.attn_implementation=flash_attention_2"], terminal_width=400)
    assert result.exit_code == 1 and "flash" in result.output and not out.exists()


def test_generate_leaves_the_tokenizer_and_the_global_rng_as_it_found_them(bundle):
    """Training pads on the right with the same tokenizer, and a seeded rollout must not reset the
    data order or dropout of the loop around it."""
    from PIL import Image

    from dxcli.model.generate import generate

    bundle.tokenizer.padding_side = "right"
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    image = Image.new("RGB", (64, 64), (120, 90, 60))
    out = generate(bundle, [image, image], ["Real or fake?", template.DEFAULT_QUESTION], max_new_tokens=4,
                   temperature=1.0, samples_per_image=2, seed=7)
    assert len(out.texts) == 4
    assert bundle.tokenizer.padding_side == "right"
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream went on untouched
    again = generate(bundle, [image, image], ["Real or fake?", template.DEFAULT_QUESTION], max_new_tokens=4,
                     temperature=1.0, samples_per_image=2, seed=7)
    assert again.token_ids == out.token_ids  # and the seed alone decides the samples
