"""Composition: a timm tower with pretrained weights + a causal LM from a local folder or the
Hugging Face cache, checked to have loaded completely, into a DX-LLaVA with a fresh projector and
binary head. A missing LLM or vision tensor is a DxError, never a silently random part."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dxcli.base import template
from dxcli.base.errors import DxError
from dxcli.config import ModelConfig
from dxcli.model.build import (VISION_WEIGHT_FILES, ModelBundle, default_dtype, dx_config, make_processor, preview,
                               set_generation_tokens, summarise, unexpected_note, vision_config_for)
from dxcli.model.dxllava import DxLlavaConfig, DxLlavaForConditionalGeneration


def compose(cfg: ModelConfig, dtype: torch.dtype | None = None, seed: int = 0) -> ModelBundle:
    """timm tower (`cfg.vision`, weights from `cfg.vision_weights`) + causal LM (`cfg.llm`);
    `<image>` (and a pad token if missing) added; projector and head fresh."""
    with hub_access(cfg.download):
        tokenizer = _load_tokenizer(cfg.llm)
        llm, llm_notes = _load_llm(cfg.llm, dtype)
        vision_config, stride = vision_config_for(cfg.vision, {}, cfg.image_size)
        tower, vision_notes = _load_vision(vision_config, cfg.vision_weights, llm.dtype)
    _add_special_tokens(tokenizer)

    config = dx_config(vision_config, llm.config, tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN),
                        (cfg.image_size // stride) ** 2, cfg.head_hidden)
    model = _assemble(config, tower, llm, seed)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config = llm.generation_config
    set_generation_tokens(model, tokenizer)
    bundle = ModelBundle(model, tokenizer, make_processor(tokenizer, cfg.image_size, stride),
                         notes=llm_notes + vision_notes)
    summarise(bundle, f"composed: vision {cfg.vision} + llm {cfg.llm}")
    return bundle


def _assemble(config: DxLlavaConfig, tower: Any, llm: Any, seed: int) -> DxLlavaForConditionalGeneration:
    """Build the skeleton on the meta device (no 7B random init), then plug in the loaded parts
    and initialise only the projector and the head."""
    config.dtype = llm.dtype
    with torch.device("meta"), default_dtype(llm.dtype):
        model = DxLlavaForConditionalGeneration(config)
    decoder = llm.base_model
    if type(decoder) is not type(model.model.language_model):
        raise DxError(f"unsupported LLM layout: expected {type(model.model.language_model).__name__} "
                      f"inside {type(llm).__name__}, found {type(decoder).__name__}")
    model.model.vision_tower = tower
    model.model.language_model = decoder
    model.lm_head = llm.get_output_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for fresh in (model.model.multi_modal_projector, model.binary_head):
            fresh.to_empty(device="cpu")
            for module in fresh.modules():
                model._init_weights(module)
    model.tie_weights()
    leftovers = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise DxError(f"composition left uninitialised tensors: {', '.join(leftovers[:5])}")
    return model


DOWNLOAD_HINT = ("dx loads hub ids from the Hugging Face cache: fetch it once (`hf download {name}`), point the "
                 "key at a local folder, or allow downloads with --set model.download=true")


@contextmanager
def hub_access(download: bool) -> Iterator[None]:
    """Without `download`, the hub is offline for transformers and timm alike: a missing file is
    an immediate error rather than a minute of connection retries on a machine without network."""
    import huggingface_hub.constants as hub

    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = previous or not download
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def _load_tokenizer(llm: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(llm)
    except (OSError, ValueError) as exc:
        raise DxError(f"could not load the tokenizer of model.llm '{llm}': {_first_line(exc)}. "
                      + DOWNLOAD_HINT.format(name=llm)) from None


def _load_llm(llm: str, dtype: torch.dtype | None) -> tuple[Any, list[str]]:
    """AutoModelForCausalLM with a loading report; any missing key is an error."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(llm, output_loading_info=True,
                                                           dtype=dtype or torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DxError(f"could not load the LLM '{llm}': {_first_line(exc)}. " + DOWNLOAD_HINT.format(name=llm)) from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise DxError(f"LLM '{llm}' did not load completely: {len(missing)} missing "
                      f"({preview(missing)}), {len(mismatched)} mismatched ({preview(mismatched)}); "
                      "refusing to train a partly random LLM")
    return model, unexpected_note(f"LLM '{llm}'", info.get("unexpected_keys"))


def _load_vision(vision_config: Any, weights: str | None, dtype: torch.dtype) -> tuple[Any, list[str]]:
    """A TimmWrapperModel whose timm weights come from `weights`; missing keys are an error."""
    from transformers import TimmWrapperModel

    state = _vision_state_dict(vision_config.architecture, weights)
    with default_dtype(dtype):
        tower = TimmWrapperModel(vision_config)
    missing, unexpected = tower.timm_model.load_state_dict(state, strict=False)
    source = weights or f"timm's pretrained {vision_config.architecture}"
    if missing:
        raise DxError(f"vision weights '{source}' do not fit {vision_config.architecture}: "
                      f"{len(missing)} missing ({preview(missing)})")
    return tower, unexpected_note(f"vision weights '{source}'", unexpected)


def _vision_state_dict(arch: str, weights: str | None) -> dict[str, torch.Tensor]:
    """timm-format state dict from a local file/folder, a hub id, or timm's default weights."""
    import timm
    from timm.models import load_state_dict

    local = Path(weights) if weights else None
    if local is not None and local.exists():
        file = local if local.is_file() else next((local / n for n in VISION_WEIGHT_FILES if (local / n).is_file()), None)
        if file is None:
            raise DxError(f"no weights file ({', '.join(VISION_WEIGHT_FILES)}) in {local}")
        try:
            state = load_state_dict(str(file))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise DxError(f"could not read vision weights {file}: {exc}") from None
        # HF TimmWrapper folders prefix every key with `timm_model.`
        return {k.removeprefix("timm_model."): v for k, v in state.items()}
    looks_like_file = weights is not None and Path(weights).suffix in (".safetensors", ".pth", ".pt", ".bin")
    if weights is not None and (looks_like_file or weights.count("/") != 1):
        raise DxError(f"vision weights not found: '{weights}' is neither a local file/folder nor a hub id")
    overlay = {"hf_hub_id": weights, "source": "hf-hub"} if weights else None
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay).state_dict()
    except Exception as exc:  # noqa: BLE001 - network/hub failures come in many types
        where = weights or "timm's default source"
        raise DxError(f"could not load vision weights for {arch} from {where}: {_first_line(exc)}. "
                      "Give a local file with model.vision_weights, or " + DOWNLOAD_HINT.format(name=weights or arch)
                      .removeprefix("dx loads hub ids from the Hugging Face cache: ")) from None


def _add_special_tokens(tokenizer: Any) -> None:
    """`<image>` as a special token; a pad token if missing (unk when there is one, as LLaVA does)."""
    from tokenizers import AddedToken

    if template.IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(template.IMAGE_TOKEN, special=True, normalized=False)],
                             special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
