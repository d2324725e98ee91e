"""The model's shapes for the memory planner, without weights: the LLM and the vision tower are
built on the meta device from shapes shipped with the profiles (`model.shapes`), so planning a 7B
run needs neither a download nor memory."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dxcli.base.errors import DxError, UsageError
from dxcli.config import ModelConfig
from dxcli.model.build import TINY_VISION_ARCH, timm_on_meta
from dxcli.rl.clip import parse_open_clip, registered_arch

# VCR's CLIP (prpo.clip), parameters per open_clip architecture, counted from open_clip's model
# config (open_clip.get_model_config); tests/test_open_clip.py checks each against a meta build.
# convnext_large_d_320 (embed_dim 768; image: timm convnext_large at 320 px + an MLP head; text: 16
# blocks of width 768, context 77, vocab 49408):
#   image  ConvNeXt-L trunk (depths 3-3-27-3, dims 192-384-768-1536; a block of width d holds
#          8d^2 + 58d) 196,230,336 + MLP head 1536*1536 + 1536 + 1536*768 = 3,540,480 -> 199,770,816
#   text   16 x (12 * 768^2 + 13 * 768 = 7,087,872) = 113,405,952 + token embedding 49408 * 768 =
#          37,945,344 + positions 77 * 768 = 59,136 + final LayerNorm 1,536 + projection 768 * 768
#          = 589,824 -> 152,001,792
#   + logit scale 1 = 351,772,609: 1.41 GB in fp32, the size of the published weights file
OPEN_CLIP_PARAMS = {"convnext_large_d_320": 351_772_609}
# A transformers CLIPModel the planner cannot read offline: assumed ViT-L/14-sized
# (openai/clip-vit-large-patch14), the larger of the two CLIPs dx documents.
ASSUMED_CLIP_PARAMS = 427_616_513

# LoRA targets when a plan is asked for without a config's model.lora.target_modules (its default):
# every linear layer of the LLM's decoder blocks.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShapes:
    """Parameter counts per part and the shapes the planner needs; from a meta-device build."""

    vision: int
    projector: int
    llm: int
    head: int
    largest_layer: int  # most parameters held directly by one module (DeepSpeed's "largest layer")
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    image_tokens: int
    lora_per_rank: int  # LoRA parameters per unit of rank over lora_targets
    source: str
    lora_targets: tuple[str, ...] = LORA_TARGETS

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.head


def shapes_dir() -> Path:
    return Path(str(resources.files("dxcli") / "profiles" / "models"))


def _read_shapes_file(name: str) -> tuple[dict[str, Any], Path]:
    """A shipped name (dxcli/profiles/models/NAME.json) or a path to a JSON file."""
    shipped = shapes_dir() / f"{name}.json"
    path = shipped if shipped.is_file() else Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in shapes_dir().glob("*.json")))
        raise UsageError(f"model.shapes={name}: no such file, nor a shipped shapes name (known: {known})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DxError(f"model.shapes: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DxError(f"model.shapes: {path} must hold a JSON object")
    return data, path


def _shape_inputs(model: ModelConfig) -> tuple[dict[str, Any], str, dict[str, Any], int, str]:
    """(LLM config dict, timm arch, timm model_args, added tokens, where the shapes come from)."""
    if model.preset == "tiny":
        t = model.tiny
        llm = {"model_type": "llama", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
               "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
               "num_key_value_heads": t.num_heads, "vocab_size": t.vocab_size, "tie_word_embeddings": False}
        args = {"depths": list(t.vision_depths), "dims": list(t.vision_dims)}
        return llm, TINY_VISION_ARCH, args, 0, "the tiny preset (model.tiny)"  # its BPE holds <image>
    if model.shapes:
        data, path = _read_shapes_file(model.shapes)
        source = f"model.shapes={model.shapes}"
        if "llm" not in data:  # a plain HF config.json of the LLM: the tower is the config's
            return data, model.vision, {}, 1, source
        _check_vision_matches(data.get("vision") or {}, model, path)
        return data["llm"], model.vision, {}, 1, source
    local = Path(model.llm) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8")), model.vision, {}, 1, str(local)
    raise UsageError(f"the memory plan needs the LLM's shapes offline: set model.shapes to a shipped name "
                     f"({', '.join(sorted(p.stem for p in shapes_dir().glob('*.json')))}) or a config.json path")


def _check_vision_matches(vision: dict[str, Any], model: ModelConfig, path: Path) -> None:
    """A shapes file describes one model: planning another tower with it would be silently wrong."""
    timm_name, size = vision.get("timm"), vision.get("image_size")
    if (timm_name and timm_name != model.vision) or (size and size != model.image_size):
        raise UsageError(f"model.shapes ({path}) describes vision {timm_name} at {size} px but the config builds "
                         f"{model.vision} at {model.image_size} px: point model.shapes at a matching file")


def model_shapes(model: ModelConfig) -> ModelShapes:
    """Parameter counts of the DX-LLaVA `model` describes, from a meta-device build (no weights)."""
    llm, arch, args, added, source = _shape_inputs(model)
    return _count_shapes(json.dumps(llm, sort_keys=True), arch, json.dumps(args, sort_keys=True),
                         model.image_size, model.head_hidden, added, source, tuple(model.lora.target_modules))


@functools.lru_cache(maxsize=16)  # a fix search re-plans many times; the build happens once
def _count_shapes(llm_json: str, arch: str, args_json: str, image_size: int, head_hidden: int, added: int,
                  source: str, lora_targets: tuple[str, ...] = LORA_TARGETS) -> ModelShapes:
    llm_cfg = _llm_config(json.loads(llm_json), added)
    llm, llm_largest, lora_per_rank = _meta_llm(llm_cfg, lora_targets)
    vision, width, stride, vision_largest = _meta_vision(arch, json.loads(args_json))
    if image_size < stride or image_size % stride:
        raise UsageError(f"model.image_size must be a multiple of the vision stride {stride}, got {image_size}")
    h = llm_cfg.hidden_size
    projector = width * h + h + h * h + h  # FastVlm's projector: Linear(width, h), GELU, Linear(h, h)
    head = h * head_hidden + head_hidden + head_hidden + 1  # Linear(h, head_hidden), ReLU, Linear(., 1)
    heads = llm_cfg.num_attention_heads
    return ModelShapes(
        vision=vision, projector=projector, llm=llm, head=head,
        largest_layer=max(llm_largest, vision_largest, width * h, h * h),
        hidden=h, layers=llm_cfg.num_hidden_layers, kv_heads=getattr(llm_cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(llm_cfg, "head_dim", None) or h // heads, vocab=llm_cfg.vocab_size,
        image_tokens=(image_size // stride) ** 2, lora_per_rank=lora_per_rank, source=source,
        lora_targets=lora_targets)


def _llm_config(data: dict[str, Any], added: int) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise DxError("model.shapes: the LLM config has no model_type (expected an HF config.json)")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise DxError(f"model.shapes: not a usable {model_type} config: {exc}") from None
    config.vocab_size += added  # compose adds <image> and resizes the embeddings (model.build)
    return config


def _meta_llm(llm_cfg: Any, lora_targets: tuple[str, ...]) -> tuple[int, int, int]:
    """(parameters, largest layer, LoRA parameters per rank) of the causal LM, built on meta."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_cfg)
    lora = sum(m.in_features + m.out_features for name, m in llm.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets)
    return _unique_numel(llm), _largest_layer(llm), lora


def _meta_vision(arch: str, args: dict[str, Any]) -> tuple[int, int, int, int]:
    """(parameters, output width, stride, largest layer) of the timm tower as TimmWrapperModel builds it."""
    if args.get("dims"):
        args = {**args, "depths": tuple(args["depths"]), "dims": tuple(args["dims"])}
    net, stride = timm_on_meta(arch, args)
    return _unique_numel(net), net.num_features, stride, _largest_layer(net)


def _unique_numel(module: Any) -> int:
    return sum({id(p): p.numel() for p in module.parameters()}.values())  # tied weights once


def _largest_layer(module: Any) -> int:
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())


def clip_parameters(spec: str) -> tuple[int, str]:
    """(parameters, where the count comes from) of the CLIP `prpo.clip` names, offline: the
    shipped count of a known open_clip architecture, else a meta-device build (open_clip's config,
    or a local CLIPModel folder's config.json), else the ViT-L/14 assumption."""
    parsed = parse_open_clip(spec)
    if parsed is not None:
        if parsed.arch in OPEN_CLIP_PARAMS:
            return OPEN_CLIP_PARAMS[parsed.arch], f"open_clip {parsed.arch}"
        try:
            return _open_clip_count(parsed.arch), f"open_clip {parsed.arch}, built on meta"
        except Exception:  # noqa: BLE001 - no open_clip, or an unknown arch: plan with the assumption
            return ASSUMED_CLIP_PARAMS, f"open_clip {parsed.arch} unreadable, assumed ViT-L/14-sized"
    config = Path(spec).expanduser() / "config.json"
    if config.is_file():
        return _clip_model_count(str(config)), f"{config}, built on meta"
    return ASSUMED_CLIP_PARAMS, "assumed ViT-L/14-sized"


@functools.lru_cache(maxsize=8)
def _open_clip_count(arch: str) -> int:
    import open_clip
    import torch

    with torch.device("meta"):
        return _unique_numel(open_clip.create_model(registered_arch(open_clip, arch), pretrained=None, device="meta"))


@functools.lru_cache(maxsize=8)
def _clip_model_count(config_json: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        return _unique_numel(AutoModel.from_config(AutoConfig.from_pretrained(Path(config_json).parent)))
