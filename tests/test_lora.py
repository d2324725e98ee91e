"""LoRA (model.lora.r > 0): adapters on the LLM only, PRPO's reference = the policy with adapters off
(no second model), a merged plain checkpoint plus RUN/adapter, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dxcli import config

FAST = ["hardware.num_workers=0", "prpo.group_size=2", "prpo.images_per_step=2", "hardware.micro_batch=4",
        "train.log_every=1"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_adapters_sit_on_the_llm_only_and_merge_exactly():
    from dxcli.model.checkpoint import build_model
    from dxcli.model.lora import apply_lora, merged_state_dict

    cfg = config.resolve("cpu-tiny", ["model.lora.r=4"]).config
    model = apply_lora(build_model(cfg.model, ["a few words of text"]).model, cfg.model.lora)
    adapted = {name for name, _ in model.named_parameters() if "lora_" in name}
    assert adapted and all(".language_model." in name for name in adapted)
    assert len(adapted) == 2 * 7 * cfg.model.tiny.num_layers  # A and B on q,k,v,o,gate,up,down per layer
    model.freeze(vision=True, llm=False, projector=False, head=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapted <= trainable and not any(".language_model." in n and "lora_" not in n for n in trainable)
    for name, param in model.named_parameters():  # B starts at 0: make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, expected)
        plain = type(model.get_base_model())(model.get_base_model().config)
        plain.load_state_dict(merged_state_dict(model))  # strict: exactly the plain model's keys
        assert torch.allclose(plain.eval()(input_ids=ids).logits, expected, atol=1e-5)


def test_lora_prpo_loads_no_second_model_and_saves_a_plain_checkpoint(trained, demo_root, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from dxcli.jobs.stages import run_prpo_stage
    from dxcli.model.dxllava import DxLlavaForConditionalGeneration

    built = []
    original_init = DxLlavaForConditionalGeneration.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self))
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(DxLlavaForConditionalGeneration, "__init__", counting_init)
    run = tmp_path / "rl"
    resolved = config.resolve("cpu-tiny", [*FAST, "train.max_steps=4", "prpo.max_new_tokens=80", "prpo.beta=0.05",
                                           "model.lora.r=4", "prpo.lr=1e-3"])
    run_prpo_stage(out=run, resolved=resolved, model=str(trained["instruct"]), data=demo_root, say=lambda *_: None)
    assert len(built) == 1  # the policy; the KL reference is that model with its adapters off
    monkeypatch.setattr(DxLlavaForConditionalGeneration, "__init__", original_init)
    rows = metrics(run)
    assert rows[0]["kl"] == 0  # adapters start at B = 0: policy and reference are one function
    assert any(r["loss"] != 0 for r in rows[:-1]) and any(r["kl"] > 0 for r in rows[1:])  # they moved apart
    # RUN/model: a plain checkpoint, adapters merged; dx and transformers open it without peft
    from transformers import FastVlmForConditionalGeneration

    from dxcli.model.checkpoint import load_checkpoint

    merged = load_file(run / "model" / "model.safetensors")
    assert not any("lora_" in key or "base_layer" in key for key in merged)
    assert type(load_checkpoint(run / "model").model).__name__ == "DxLlavaForConditionalGeneration"
    DxLlavaForConditionalGeneration.from_pretrained(run / "model")
    _, info = FastVlmForConditionalGeneration.from_pretrained(run / "model", output_loading_info=True)
    assert not info["missing_keys"] and all(k.startswith("binary_head") for k in info["unexpected_keys"])
    # RUN/adapter: peft's folder; applied to the start and merged by peft, it gives RUN/model's weights
    from peft import PeftModel

    start = load_checkpoint(trained["instruct"]).model
    by_peft = PeftModel.from_pretrained(start, run / "adapter").merge_and_unload().state_dict()
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(by_peft[q_proj], merged[q_proj], atol=1e-6)
    assert not torch.equal(merged[q_proj], load_file(trained["instruct"] / "model.safetensors")[q_proj])


def test_lora_instruct_stops_and_resumes(tmp_path, demo_root, trained, monkeypatch):
    from dxcli.jobs.stages import run_sft_stage

    sets = ["hardware.num_workers=0", "train.max_steps=6", "train.log_every=1", "hardware.micro_batch=4",
            "model.lora.r=4"]
    run_sft_stage("instruct", out=tmp_path / "whole", data=demo_root, model=str(trained["align"]),
                  resolved=config.resolve("cpu-tiny", sets), say=lambda *_: None)
    monkeypatch.setenv("DX_STOP_AFTER_STEP", "3")
    with pytest.raises(SystemExit):
        run_sft_stage("instruct", out=tmp_path / "split", data=demo_root, model=str(trained["align"]),
                      resolved=config.resolve("cpu-tiny", sets), say=lambda *_: None)
    monkeypatch.delenv("DX_STOP_AFTER_STEP")
    run_sft_stage("instruct", out=tmp_path / "split", model=str(trained["align"]), resume=True,
                  resolved=config.resolve("cpu-tiny", []), say=lambda *_: None)
    resumed, whole = metrics(tmp_path / "split"), metrics(tmp_path / "whole")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, whole):  # adapters, projector, head and their optimizer states came back
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    # the resumable checkpoint holds what learns, not the frozen LLM
    step = sorted((tmp_path / "split" / "checkpoints").glob("step-*"))[-1]
    saved = torch.load(next(step.glob("*model_states.pt")), weights_only=False)["module"]
    assert any("lora_" in k for k in saved) and not any(k.endswith("base_layer.weight") for k in saved)
    assert (tmp_path / "split" / "adapter" / "adapter_config.json").is_file()
