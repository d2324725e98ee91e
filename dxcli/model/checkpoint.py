"""dx checkpoint folders: save, load, find (a run folder's model/), and the one way to get a model
from a config (checkpoint, tiny preset or composition)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dxcli.base.errors import DxError
from dxcli.config import ModelConfig
from dxcli.model.build import ModelBundle, build_tiny, compose, preview, summarise, unexpected_note
from dxcli.model.dxllava import DxLlavaForConditionalGeneration


def save_checkpoint(bundle: ModelBundle, path: str | Path, state_dict: dict | None = None) -> None:
    """A `save_pretrained` folder (safetensors) with tokenizer and processor beside it.
    `state_dict`: a gathered state dict (e.g. under ZeRO-3), passed to save_pretrained."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(path, state_dict=state_dict)
    bundle.processor.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    _readable_like_other_files(path)


def _readable_like_other_files(path: Path) -> None:
    """safetensors writes its file through a private temporary (mode 0600); give every file of the
    folder the mode the user's umask gives any new file, so the weights are shared like the rest."""
    mask = os.umask(0)
    os.umask(mask)
    for file in path.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~mask)


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> ModelBundle:
    """Model, tokenizer and processor from a dx checkpoint folder (dtype None: as saved)."""
    from transformers import LlavaProcessor

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DxError(f"not a dx checkpoint: {path} has no config.json" if path.is_dir()
                      else f"checkpoint folder not found: {path}")
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    if "head_hidden" not in saved:  # a plain LLM or VLM folder: no binary head to load
        raise DxError(f"not a dx checkpoint: {path} holds a '{saved.get('model_type')}' model without dx's "
                      "binary head (compose one with model.llm/model.vision instead)")
    model, info = DxLlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype or "auto", output_loading_info=True
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
    """The one entry point: `cfg.path` -> checkpoint; preset tiny -> build_tiny; else compose."""
    if cfg.path:
        return load_checkpoint(cfg.path, dtype=dtype)
    if cfg.preset == "tiny":
        if texts is None:
            raise DxError("the tiny preset trains its tokenizer on the records' text: pass texts")
        return build_tiny(cfg, texts, dtype=dtype)
    return compose(cfg, dtype=dtype)


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
