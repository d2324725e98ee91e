"""dx checkpoint folders: save, load, find (a run folder's model/), and the one way to get a model
from a config (checkpoint, tiny preset or composition)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from dxcli.base.errors import DxError
from dxcli.config import ModelConfig
from dxcli.model.build import ModelBundle, build_tiny, compose, preview, summarise, unexpected_note
from dxcli.model.dxllava import DxLlavaConfig, DxLlavaForConditionalGeneration, register_auto_classes


def save_checkpoint(bundle: ModelBundle, path: str | Path, state_dict: dict | None = None) -> None:
    """A `save_pretrained` folder (safetensors) with tokenizer and processor beside it.
    `state_dict`: a gathered state dict (e.g. under ZeRO-3), passed to save_pretrained."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(path, state_dict=state_dict)
    bundle.processor.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)


def check_attention(attn_implementation: str | None) -> None:
    """A one-line error, before any weight is read, for an attention kernel this machine lacks
    (transformers would fail later, deep in the load, with a traceback)."""
    if attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise DxError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                      "(pip install flash-attn); the default sdpa needs nothing")
    if not torch.cuda.is_available():
        raise DxError("model.attn_implementation=flash_attention_2 runs on CUDA GPUs only; use sdpa here")


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None,
                    attn_implementation: str | None = None) -> ModelBundle:
    """Model, tokenizer and processor from a dx checkpoint folder (dtype None: as saved;
    attn_implementation None: transformers' default, sdpa where PyTorch has it)."""
    from transformers import LlavaProcessor

    check_attention(attn_implementation)
    register_auto_classes()
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DxError(f"not a dx checkpoint: {path} has no config.json" if path.is_dir()
                      else f"checkpoint folder not found: {path}")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != DxLlavaConfig.model_type:
        raise DxError(f"not a dx checkpoint: {path} holds a '{model_type}' model, expected "
                      f"'{DxLlavaConfig.model_type}' (compose one with model.llm/model.vision instead)")
    model, info = DxLlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype or "auto", attn_implementation=attn_implementation, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise DxError(f"checkpoint {path} is incomplete: {len(missing)} missing tensors ({preview(missing)})")
    try:
        processor = LlavaProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DxError(f"checkpoint {path} has no usable tokenizer/processor: {exc}") from None
    bundle = ModelBundle(model, processor.tokenizer, processor,
                         notes=unexpected_note(f"checkpoint {path}", info.get("unexpected_keys")))
    summarise(bundle, f"checkpoint {path}")
    return bundle


def build_model(cfg: ModelConfig, texts: list[str] | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
    """The one entry point: `cfg.path` -> checkpoint; preset tiny -> build_tiny; else compose.
    `dtype` is the run's precision: a composed 7B LLM loads in bf16 directly, not via float32."""
    if cfg.path:
        return load_checkpoint(cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    check_attention(cfg.attn_implementation)
    if cfg.preset == "tiny":
        if texts is None:
            raise DxError("the tiny preset trains its tokenizer on the records' text: pass texts")
        bundle = build_tiny(cfg, texts, dtype=dtype)
    else:
        bundle = compose(cfg, dtype=dtype)
    bundle.model.set_attn_implementation(cfg.attn_implementation)
    return bundle


def resolve_model_path(model: str | None) -> str | None:
    """A checkpoint folder, or a run folder whose `model/` is one."""
    if model is None:
        return None
    path = Path(model)
    if (path / "model" / "config.json").is_file():
        return str(path / "model")
    if path.exists() and not (path / "config.json").is_file():
        raise DxError(f"--model {model}: not a dx checkpoint (no config.json) nor a run folder with model/")
    return model
