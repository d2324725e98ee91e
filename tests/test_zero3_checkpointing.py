"""ZeRO-3 + gradient checkpointing with frozen weights inside the checkpointed layers (align: the
whole LLM; LoRA: the LLM's own weights): the DeepSpeed floor, that the recompute really runs
through frozen weights, and a 2-process ZeRO-3 align with checkpointing on.

DeepSpeed 0.19.2 fails that run in the first backward with `CheckpointError ... saved metadata
{'shape': torch.Size([128])} ... recomputed metadata {'shape': torch.Size([0])}`; 0.19.3
(deepspeedai/DeepSpeed#8148) passes it (dxcli/model/checkpointing.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dxcli import config
from dxcli.base import template
from dxcli.base.errors import DxError
from dxcli.config import LoraConfig
from dxcli.model import checkpointing
from dxcli.model.checkpoint import build_model, save_checkpoint
from dxcli.model.lora import apply_lora
from dxcli.training.sft import frozen_parts

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "**Skin Texture**: natural pores and realistic texture.\n\n### Answer: real",
    "**Edges**: blurry edges, warping and synthetic artifacts.\n\n### Answer: fake",
] * 5


def tiny():
    """The cpu-tiny model (its image size: the demo data's 96 px), freshly built."""
    return build_model(config.resolve("cpu-tiny").config.model, TEXTS)


def test_the_floor_is_pinned_and_installed():
    pin = [line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.strip().startswith('"deepspeed')]
    assert len(pin) == 1 and f'"deepspeed>={checkpointing.DEEPSPEED_FLOOR}"' in pin[0], pin
    installed = checkpointing.installed_deepspeed()
    assert installed and not checkpointing.below_floor(installed), installed


def test_zero3_checkpointing_below_the_floor_is_refused_in_one_line():
    with pytest.raises(DxError, match=r"needs deepspeed>=0\.19\.3 \(installed 0\.19\.2;") as refused:
        checkpointing.check_deepspeed(3, True, "0.19.2")
    assert "\n" not in str(refused.value) and "grad_checkpointing=false" in str(refused.value)
    for ok in [(3, True, "0.19.3"), (3, True, "0.19.8"), (3, True, "0.20.0.dev0+abc"), (2, True, "0.16.0"),
               (3, False, "0.16.0")]:
        checkpointing.check_deepspeed(*ok)


@pytest.mark.parametrize("stage", ["align", "lora"])
def test_checkpointed_layers_hold_frozen_weights_and_are_recomputed(stage):
    bundle = tiny()
    cfg = config.resolve("cpu-tiny").config
    model = bundle.model
    if stage == "lora":  # PRPO/instruct with adapters: the LLM's own weights frozen, adapters learn
        model = apply_lora(model, LoraConfig(r=4, dropout=0.0))
    model.freeze(**frozen_parts("align" if stage == "align" else "instruct", cfg))
    names = checkpointing.enable(model)
    model.config.use_cache = False
    model.train()
    inner = model.get_base_model() if stage == "lora" else model
    decoder = inner.model.language_model.layers
    assert len(names) == len(decoder) >= 2 and all(".language_model.layers." in n for n in names), names
    assert decoder[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    frozen = [n for n, p in decoder.named_parameters() if not p.requires_grad]
    if stage == "align":
        assert len(frozen) == len(list(decoder.parameters()))
    else:
        assert {"0.input_layernorm.weight", "0.self_attn.q_proj.base_layer.weight"} <= set(frozen), frozen
    # ZeRO-3 gathers and releases weights in module hooks; the backward's recompute must fire them
    # again on a module whose weight is frozen (the norm): the path the DeepSpeed fix is about
    fired = []
    decoder[0].input_layernorm.register_forward_pre_hook(lambda *_: fired.append(1))
    bundle.tokenizer.padding_side = "left"
    rng = np.random.default_rng(0)
    batch = bundle.processor(images=[Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
                                     for _ in range(2)],
                             text=[template.prompt(template.DEFAULT_QUESTION)] * 2, padding=True, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"], binary_labels=torch.tensor([0, 1]))
    assert len(fired) == 1
    (out.loss + out.bin_loss).backward()
    assert len(fired) == 2, "the backward did not recompute the checkpointed layer"
    assert all(p.grad is None for n, p in decoder.named_parameters() if n in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner.model.multi_modal_projector.parameters())
    if stage == "lora":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in decoder.named_parameters() if "lora_" in n)


@pytest.mark.slow
def test_two_process_zero3_align_with_checkpointing(tmp_path, demo_root):
    """align (LLM frozen) on 2 processes, ZeRO-3, checkpointing on: both steps, projector moved, LLM not."""
    start = tmp_path / "start"
    save_checkpoint(tiny(), start)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dxcli", "train", "align", "--data", str(demo_root), "--model", str(start),
         "--out", str(out), "--nproc-per-node", "2", "--set", "hardware.zero_stage=3", "--set",
         "train.grad_checkpointing=true", "--set", "train.max_steps=2", "--set", "train.log_every=1", "--set",
         "hardware.num_workers=0", "--set", "hardware.micro_batch=1"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    from safetensors.torch import load_file

    def state(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    before, after = state(start), state(out / "model")
    assert before.keys() == after.keys()
    moved = {part: max((after[k] - before[k]).abs().max().item() for k in before if part in k)
             for part in ("multi_modal_projector", "language_model", "lm_head")}
    assert moved["language_model"] == 0.0 == moved["lm_head"] < 1e-6 < moved["multi_modal_projector"], moved
