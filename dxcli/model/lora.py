"""LoRA on the LLM of a DX-LLaVA (peft): adapters on, adapters merged into a plain checkpoint, the
adapter folder. The vision tower, projector and head keep their plain layers.

peft wraps the model in a PeftModel whose attribute look-ups fall through to the DX-LLaVA
(`prompt_embeds`, `freeze`, `generate`, ...), so the training loops use it as they use the model.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

from dxcli.base.errors import DxError
from dxcli.config import LoraConfig
from dxcli.model.build import ModelBundle
from dxcli.model.checkpoint import save_checkpoint
from dxcli.model.dxllava import ADAPTER_MARK, DxLlavaForConditionalGeneration

PEFT_PREFIX = "base_model.model."  # where a PeftModel's state dict puts the wrapped model's keys


def apply_lora(model: DxLlavaForConditionalGeneration, cfg: LoraConfig) -> Any:
    """Adapters of rank `cfg.r` on the LLM's `cfg.target_modules`; returns the PeftModel.

    Targets are matched under `model.language_model` only: a tower with layers of the same name
    (a ViT's q_proj) must stay untouched. Everything but the adapters is frozen here; the stage's
    own `freeze` then decides what else learns (projector, head).
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise DxError("model.lora.r > 0 needs peft: pip install peft") from None
    names = "|".join(re.escape(name) for name in cfg.target_modules)
    peft_config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                                 target_modules=rf"model\.language_model\..*\.({names})")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # peft: no module matched
        raise DxError(f"model.lora.target_modules={cfg.target_modules}: no such layer in the LLM ({exc})") from None


def is_lora(model: Any) -> bool:
    """A PeftModel? Without peft imported there can be none (and no import is paid for asking)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_state_dict(peft_model: Any, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A plain DX-LLaVA state dict: every adapted weight W becomes W + (alpha / r) * B @ A.

    Works from a state dict (`state`, e.g. gathered under ZeRO-3, where the live weights are
    partitions) rather than peft's in-place `merge_and_unload`, and does the sum in float32.
    """
    state = peft_model.state_dict() if state is None else state
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    scaling = config.lora_alpha / config.r
    merged = {}
    for key, value in state.items():
        if ADAPTER_MARK in key:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if ".base_layer." in name:
            module, leaf = name.rsplit(".base_layer.", 1)
            name = f"{module}.{leaf}"
            if leaf == "weight":
                a = state[f"{PEFT_PREFIX}{module}.lora_A.{adapter}.weight"].float()
                b = state[f"{PEFT_PREFIX}{module}.lora_B.{adapter}.weight"].float()
                value = (value.float() + scaling * (b @ a)).to(value.dtype)
        merged[name] = value.detach().cpu().contiguous()
    return merged


def save_merged(bundle: ModelBundle, model_dir: Path, adapter_dir: Path,
                state: dict[str, torch.Tensor] | None = None) -> None:
    """RUN/model: adapters merged into a plain checkpoint (dx and transformers load it without peft);
    RUN/adapter: the adapters alone (peft's format), to reapply to the starting checkpoint."""
    peft_model = bundle.model
    peft_model.save_pretrained(str(adapter_dir), state_dict=state)
    plain = ModelBundle(peft_model.get_base_model(), bundle.tokenizer, bundle.processor)
    save_checkpoint(plain, model_dir, state_dict=merged_state_dict(peft_model, state))
