"""dx checkpoint folders: save, load, find (a run folder's model/), and the one way to get a model
from a config (checkpoint, tiny preset or composition)."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dxcli.base.errors import DxError
from dxcli.config import ModelConfig
from dxcli.model.build import IMAGE_ASPECT_RATIOS, ModelBundle, build_tiny, preview, summarise, unexpected_note
from dxcli.model.compose import compose
from dxcli.model.dxllava import DxLlavaConfig, DxLlavaForConditionalGeneration
from dxcli.model.original import ORIGINAL_TYPE

# state-dict prefixes of what the binary head reads (`DxLlavaForConditionalGeneration.image_side`)
IMAGE_SIDE = ("model.vision_tower.", "model.multi_modal_projector.", "binary_head.")


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
    path = checked_folder(path)
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
    check_preprocessing(model.config, processor.image_processor, path)
    bundle = ModelBundle(model, processor.tokenizer, processor,
                         notes=unexpected_note(f"checkpoint {path}", info.get("unexpected_keys")))
    summarise(bundle, f"checkpoint {path}")
    return bundle


def checked_folder(path: str | Path) -> Path:
    """`path` when it is a dx checkpoint folder, else a DxError saying what it is."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DxError(f"not a dx checkpoint: {path} has no config.json" if path.is_dir()
                      else f"checkpoint folder not found: {path}")
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    if saved.get("model_type") == ORIGINAL_TYPE:  # LLaVA's own format, as the original project saves it
        raise DxError(f"{path} is a checkpoint of the original code (LlavaLlamaForCausalLM): import it first, "
                      f"dx model import {path} --out DIR")
    if "head_hidden" not in saved:  # a plain LLM or VLM folder: no binary head to load
        raise DxError(f"not a dx checkpoint: {path} holds a '{saved.get('model_type')}' model without dx's "
                      "binary head (compose one with model.llm/model.vision instead)")
    return path


def check_preprocessing(config: DxLlavaConfig, image_processor: Any, path: Path) -> None:
    """The saved image processor must do what config.json records (`image_aspect_ratio`): a folder
    whose two files disagree would silently feed the model other pixels than it was made with."""
    pads = bool(getattr(image_processor, "do_pad", False))
    recorded = config.image_aspect_ratio
    if recorded not in IMAGE_ASPECT_RATIOS or pads != (recorded == "pad"):
        raise DxError(f"checkpoint {path}: config.json records image_aspect_ratio '{recorded}' but its image "
                      f"processor {'pads' if pads else 'does not pad'} images; the two must agree")


@dataclass
class ImageProcessing:
    """The processor of a bundle loaded without its tokenizer: image preprocessing only."""

    image_processor: Any


def load_image_side(path: str | Path, dtype: torch.dtype | None = None) -> ModelBundle:
    """What the binary head needs and only that: the tower, projector and head tensors of a dx
    checkpoint and its image processor (tokenizer None). The LLM is built on the meta device: no
    memory, never read from disk (for a 7B checkpoint, about 95% of its bytes).

    The tensors take the dtype `from_pretrained(dtype="auto")` gives them (the config's), so the
    head's probabilities are the full model's. A checkpoint this cannot serve whole (no safetensors,
    a tensor missing, a buffer computed at init) is loaded in full instead: slower, same figures.
    """
    from transformers import AutoImageProcessor

    path = checked_folder(path)
    config = DxLlavaConfig.from_pretrained(path)
    state = image_side_tensors(path)
    if not state:
        return load_checkpoint(path, dtype)
    with torch.device("meta"):
        model = DxLlavaForConditionalGeneration(config)
    target = dtype or _config_dtype(config) or next(t.dtype for t in state.values() if t.is_floating_point())
    model.load_state_dict({k: t.to(target) if t.is_floating_point() else t for k, t in state.items()},
                          strict=False, assign=True)
    tensors = [t for module in model.image_side() for t in [*module.parameters(), *module.buffers()]]
    if any(t.is_meta for t in tensors):
        return load_checkpoint(path, dtype)
    model.eval()
    image_processor = AutoImageProcessor.from_pretrained(path)
    check_preprocessing(config, image_processor, path)
    return ModelBundle(model, None, ImageProcessing(image_processor))


def image_side_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tower, projector and head tensors read from the checkpoint's safetensors ({} when it has none);
    with a sharded checkpoint, only the shards that hold them are opened."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({path / f for k, f in weight_map.items() if k.startswith(IMAGE_SIDE)})
    else:
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            state.update({k: handle.get_tensor(k) for k in handle.keys() if k.startswith(IMAGE_SIDE)})
    return state


def _config_dtype(config: DxLlavaConfig) -> torch.dtype | None:
    value = getattr(config, "dtype", None)
    return getattr(torch, value) if isinstance(value, str) else value


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
