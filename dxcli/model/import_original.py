"""A DX-LLaVA checkpoint of the original code (dxcli/model/original.py) as a dx model: the same
weights, tokenizer and image preprocessing, and the head's clamp, so the imported model computes
what the original computed (METHOD.md §2, "Importing the original code's checkpoints")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dxcli.base import template
from dxcli.base.errors import DxError, UsageError, first_line
from dxcli.config import ModelConfig
from dxcli.model import original
from dxcli.model.build import (ModelBundle, dx_config, make_processor, preview, set_generation_tokens, summarise,
                               vision_config_for)
from dxcli.model.compose import add_special_tokens
from dxcli.model.dxllava import DxLlavaForConditionalGeneration
from dxcli.model.vision_weights import HF_HUB_PREFIX, vision_state_dict

def import_original(src: str | Path, cfg: ModelConfig, aspect_ratio: str | None = None) -> ModelBundle:
    """The DX-LLaVA in folder `src` (original format) as a dx ModelBundle, ready to save.

    `cfg` gives `image_size` (the original's towers run at 320, dx's default) and, for a checkpoint
    without tower weights, `vision_weights`. `aspect_ratio` None: the preprocessing the original ran
    for this checkpoint (`original_aspect_ratio`); "crop" or "pad" to choose."""
    src = Path(src)
    config = checked_source(src)
    state = read_state(src)
    if not any(k.startswith("model.binary_classifier.") for k in state):
        raise DxError(f"{src} holds no binary head (model.binary_classifier.*): a LLaVA, not a DX-LLaVA checkpoint. "
                      f"To start an instruct run from its LLM: --set model.llm={src}")
    stray = original.unplaced(state)
    if stray:
        raise DxError(f"{src}: {len(stray)} tensors fit nowhere in DX-LLaVA ({preview(stray)})")
    trunk, notes = tower_state(state, cfg, src)
    tokenizer, tokenizer_notes = import_tokenizer(src)
    ratio, ratio_note = (aspect_ratio, f"images: {aspect_ratio} (as asked)") if aspect_ratio else \
        original_aspect_ratio(config)
    model, stride = assemble(config, state, trunk, tokenizer, cfg.image_size, ratio, src)
    bundle = ModelBundle(model, tokenizer, make_processor(tokenizer, cfg.image_size, stride, ratio),
                         notes=[*notes, *tokenizer_notes, ratio_note])
    summarise(bundle, f"imported from the original checkpoint {src}")
    return bundle


def checked_source(src: Path) -> dict[str, Any]:
    """config.json of `src` when it is an original-format DX-LLaVA folder, else a one-line DxError."""
    if not src.exists():
        raise UsageError(f"no such file or folder: {src}")
    if not src.is_dir() or not (src / "config.json").is_file():
        raise DxError(f"{src} is not a checkpoint folder (no config.json)")
    config = original.read_config(src)
    if "head_hidden" in config:
        raise DxError(f"{src} is already a dx model folder: nothing to import")
    kind = original.folder_format(src)
    if kind == "llava-hf":
        raise DxError(f"{src} is a transformers LlavaForConditionalGeneration without DX-LLaVA's binary head: nothing "
                      f"to import (to start an instruct run from its LLM: --set model.llm={src})")
    if kind != "original" or "mm_vision_tower" not in config:
        raise DxError(f"{src} holds a '{config.get('model_type')}' model: neither a checkpoint of the original code "
                      f"(LlavaLlamaForCausalLM, model_type {original.ORIGINAL_TYPE}) nor a dx model")
    projector = config.get("mm_projector_type", "linear")  # LLaVA's default when the key is absent
    if projector != "mlp2x_gelu":
        raise DxError(f"{src} has a '{projector}' projector; DX-LLaVA's is mlp2x_gelu (Linear-GELU-Linear), "
                      "the only kind dx imports")
    return config


def read_state(src: Path) -> dict[str, torch.Tensor]:
    """Main weight files and side files (mm_projector.bin, clip_model.bin) together; where both
    hold a tensor the main files' copy is kept (the side files are copies of the same weights)."""
    if (src / "adapter_config.json").is_file():
        raise DxError(f"{src} holds LoRA adapters (adapter_config.json): merge them into their base model with the "
                      "original code first, then import the merged folder")
    side = [src / name for name in original.SIDE_FILES if (src / name).is_file()]
    main = original.weight_files(src)
    if not main and not side:
        raise DxError(f"{src} holds no weights (*.safetensors, pytorch_model*.bin, "
                      f"{', '.join(original.SIDE_FILES)})")
    return {**original.read_tensors(side), **original.read_tensors(main)}


def tower_state(state: dict[str, torch.Tensor], cfg: ModelConfig,
                src: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ConvNeXt trunk: the checkpoint's own, or `model.vision_weights` when it holds none."""
    trunk = original.trunk_state(state)
    if trunk and cfg.vision_weights:
        raise DxError(f"{src} holds its own tower weights: model.vision_weights is only for a checkpoint "
                      "without them; leave it unset")
    if trunk:
        return trunk, []
    if not cfg.vision_weights:
        raise DxError(f"{src} holds no tower weights ({original.ORIGINAL_TRUNK}* in its weights or clip_model.bin): "
                      "give them with --set model.vision_weights=FILE (open_clip's convnext_large_d_320 "
                      "weights, or a timm state dict)")
    # the original's tower wraps timm's convnext_large (open_clip's convnext_large_d_320)
    given, notes = vision_state_dict("convnext_large", cfg.vision_weights, cfg.image_size, cfg.download)
    # the original runs the stem and stages only: a classifier or open_clip's MLP head is never used
    trunk = {k: t for k, t in given.items() if not k.startswith("head.") or k.startswith("head.norm.")}
    return trunk, [*notes, f"tower weights from model.vision_weights={cfg.vision_weights}"]


def import_tokenizer(src: Path) -> tuple[Any, list[str]]:
    """The checkpoint's tokenizer with `<image>` (and a pad token) added, tokenising dx's prompt
    to the ids the original gave it (original.match_original_prompt)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers warns that config.json's llava_llama is no model type it knows: true, and
    # nothing to act on (only the tokenizer is read here)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, ImportError) as exc:
        raise DxError(f"cannot read the tokenizer of {src}: {first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    add_special_tokens(tokenizer)
    check = original.match_original_prompt(tokenizer)
    if check.matches:
        return tokenizer, []
    return tokenizer, [f"warning: this tokenizer gives dx's prompt other ids than the original code did "
                       f"({len(check.ours)} against {len(check.original)} tokens); generated text may differ"]


def original_aspect_ratio(config: dict[str, Any]) -> tuple[str, str]:
    """("crop" | "pad", a line saying why) for what the original ran on this checkpoint's images.

    With an open_clip tower (every DX-LLaVA) the original's training (train.py attaches open_clip's
    transform as `openclip_preprocess` and uses it first) and evaluation (eval_dx_llava_multi_gpu.py)
    both use open_clip's own preprocessing: shortest side resized, centre crop. Its config's
    `image_aspect_ratio: pad` only acts in their fallback path (LLaVA's expand2square), taken when
    open_clip's transform is missing. Other towers follow `image_aspect_ratio`."""
    tower = str(config.get("mm_vision_tower", ""))
    if tower.startswith(HF_HUB_PREFIX):  # how the original names an open_clip tower (clip_encoder.py)
        return "crop", ("images: resized and centre-cropped, as the original's training and evaluation did with "
                        "its open_clip tower (its config's image_aspect_ratio applies only when open_clip's "
                        "preprocessing is missing); --pad pads to a square instead")
    ratio = "pad" if config.get("image_aspect_ratio") == "pad" else "crop"
    return ratio, f"images: {ratio} (the checkpoint's image_aspect_ratio)"


def assemble(config: dict[str, Any], state: dict[str, torch.Tensor], trunk: dict[str, torch.Tensor], tokenizer: Any,
             image_size: int, aspect_ratio: str, src: Path) -> tuple[DxLlavaForConditionalGeneration, int]:
    """DX-LLaVA built on the meta device from the configs, then given the checkpoint's tensors."""
    arch, args = original.convnext_tower(trunk)
    vision_config, stride = vision_config_for(arch, args, image_size)
    text_config = original.text_config_of(config)
    text_config.vocab_size = max(len(tokenizer), text_config.vocab_size)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(text_config, name, getattr(tokenizer, name))
    fc1 = state["model.binary_classifier.fc1.weight"] if "model.binary_classifier.fc1.weight" in state else None
    dx = dx_config(vision_config, text_config, tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN),
                   (image_size // stride) ** 2, fc1.shape[0] if fc1 is not None else 512)
    dx.head_clamp, dx.image_aspect_ratio = original.ORIGINAL_HEAD_CLAMP, aspect_ratio
    tensors = dx_tensors(state, trunk, text_config.vocab_size)
    dx.dtype = next(iter(tensors.values())).dtype
    with torch.device("meta"):
        model = DxLlavaForConditionalGeneration(dx)
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # a shape that contradicts config.json
        raise DxError(f"{src} does not fit its own config.json: {first_line(exc)}") from None
    if result.unexpected_keys:  # e.g. a trunk tensor the rebuilt ConvNeXt has no place for
        names = [original.original_name(k) for k in sorted(result.unexpected_keys)]
        raise DxError(f"{src}: {len(names)} tensors fit nowhere in DX-LLaVA ({preview(names)})")
    original.finish_meta_model(model, model.model.language_model, dx.text_config, f"checkpoint {src}")
    model.generation_config = original.saved_generation_config(src, model.generation_config)
    set_generation_tokens(model, tokenizer)
    return model.eval(), stride


def dx_tensors(state: dict[str, torch.Tensor], trunk: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under dx's names, in the LLM's dtype, vocabulary grown to `vocab`."""
    tensors = original.renamed(state, original.LLM_PREFIXES + original.PROJECTOR_PREFIXES + original.HEAD_PREFIXES)
    tensors.update({original.DX_TRUNK + k: t for k, t in trunk.items()})
    dtype = tensors["lm_head.weight"].dtype if "lm_head.weight" in tensors else torch.float32
    return {k: t.to(dtype) for k, t in original.grow_vocab(tensors, vocab).items()}
