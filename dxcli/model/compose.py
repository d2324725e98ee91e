"""Composition: a timm tower with pretrained weights + a causal LM from a local folder or the
Hugging Face cache, checked to have loaded completely, into a DX-LLaVA with a fresh projector and
binary head. A missing LLM or vision tensor is a DxError, never a silently random part."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dxcli.base import template
from dxcli.base.errors import DxError, first_line
from dxcli.config import ModelConfig
from dxcli.model.build import (ModelBundle, default_dtype, dx_config, make_processor, preview, set_generation_tokens,
                               summarise, unexpected_note, vision_config_for)
from dxcli.model.dxllava import DxLlavaConfig, DxLlavaForConditionalGeneration
from dxcli.model.hub import cached_hub_file, hub_access
from dxcli.model.original import LoadedLlm, folder_format, load_llava_llm
from dxcli.model.vision_weights import load_tower, locate_vision_weights, vision_state_dict

log = logging.getLogger(__name__)


def compose(cfg: ModelConfig, dtype: torch.dtype | None = None, seed: int = 0) -> ModelBundle:
    """timm tower (`cfg.vision`, weights from `cfg.vision_weights`) + causal LM (`cfg.llm`: a causal
    LM, or the language model of a LLaVA in the original or transformers' format, see
    model.original); `<image>` (and a pad token if missing) added; head fresh, projector fresh
    unless the LLaVA's fits the tower."""
    with hub_access(cfg.download):
        tokenizer = _load_tokenizer(cfg.llm)
        loaded = _load_llm(cfg.llm, dtype)
        llm = loaded.model
        vision_config, stride = vision_config_for(cfg.vision, {}, cfg.image_size)
        tower, vision_notes = _load_vision(vision_config, cfg, llm.dtype)
    add_special_tokens(tokenizer)

    config = dx_config(vision_config, llm.config, tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN),
                        (cfg.image_size // stride) ** 2, cfg.head_hidden)
    model = _assemble(config, tower, llm, seed)
    projector_notes = _start_projector(model, loaded, cfg.llm)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config = llm.generation_config
    set_generation_tokens(model, tokenizer)
    bundle = ModelBundle(model, tokenizer, make_processor(tokenizer, cfg.image_size, stride),
                         notes=loaded.notes + projector_notes + vision_notes)
    summarise(bundle, f"composed: vision {cfg.vision} + llm {cfg.llm}")
    return bundle


def check_sources(cfg: ModelConfig) -> None:
    """Before workers compose a model: the LLM is a local folder or in the Hugging Face cache
    (unless model.download lets each worker fetch it, under the hub's own file locks), and open_clip
    vision weights are on disk (fetched here, once, with model.download). One line on failure."""
    import huggingface_hub.constants as hub

    locate_vision_weights(cfg.vision_weights, cfg.download)
    llm = str(cfg.llm)
    if cfg.download or Path(llm).expanduser().exists() or llm.count("/") != 1:
        return
    if cached_hub_file(llm, "config.json") is None:
        raise DxError(f"model.llm '{llm}' is not a local folder and not in the Hugging Face cache "
                      f"{hub.HF_HUB_CACHE}. " + DOWNLOAD_HINT.format(name=llm))


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


def _start_projector(model: DxLlavaForConditionalGeneration, loaded: LoadedLlm, llm: str) -> list[str]:
    """A LLaVA's projector starts the projector when its shapes fit (input width = the tower's);
    else one line says a fresh one is trained, as the original run from LLaVA-1.5 did (its CLIP
    ViT projector takes 1024-wide features, the paper's ConvNeXt gives 1536). Nothing to say for a
    plain causal LM."""
    if not loaded.projector and not loaded.no_projector:
        return []
    own = model.model.multi_modal_projector
    width = own.linear_1.in_features
    theirs = loaded.projector.get("linear_1.weight")
    fits = {k: tuple(t.shape) for k, t in loaded.projector.items()} == {k: tuple(t.shape) for k, t in
                                                                         own.state_dict().items()}
    if fits:
        own.load_state_dict({k: t.to(own.linear_1.weight.dtype) for k, t in loaded.projector.items()})
        note = f"model.llm {llm}: the projector starts from its projector ({width} -> {own.linear_1.out_features})"
    elif theirs is not None:
        note = (f"model.llm {llm}: its projector takes {theirs.shape[1]}-wide image features and the tower gives "
                f"{width}: a fresh projector is trained")
    else:
        note = f"model.llm {llm}: a fresh projector is trained ({loaded.no_projector})"
    log.warning(note)
    return [note]


DOWNLOAD_HINT = ("dx loads hub ids from the Hugging Face cache: fetch it once (`hf download {name}`), point the "
                 "key at a local folder, or allow downloads with --set model.download=true")


def _load_tokenizer(llm: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(llm)
    except (OSError, ValueError) as exc:
        raise DxError(f"could not load the tokenizer of model.llm '{llm}': {first_line(exc)}. "
                      + DOWNLOAD_HINT.format(name=llm)) from None


def _load_llm(llm: str, dtype: torch.dtype | None) -> LoadedLlm:
    """AutoModelForCausalLM with a loading report, or the language model and projector of a LLaVA
    (original or llava-hf format, `_llava_source`); any missing key is an error."""
    from transformers import AutoModelForCausalLM

    llava = _llava_source(llm)
    if llava is not None:
        return load_llava_llm(*llava, dtype or torch.float32, name=llm)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(llm, output_loading_info=True,
                                                           dtype=dtype or torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DxError(f"could not load the LLM '{llm}': {first_line(exc)}. " + DOWNLOAD_HINT.format(name=llm)) from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise DxError(f"LLM '{llm}' did not load completely: {len(missing)} missing "
                      f"({preview(missing)}), {len(mismatched)} mismatched ({preview(mismatched)}); "
                      "refusing to train a partly random LLM")
    return LoadedLlm(model, unexpected_note(f"LLM '{llm}'", info.get("unexpected_keys")))


def _llava_source(llm: str) -> tuple[str | Path, str] | None:
    """(what to load, "original" | "llava-hf") when model.llm is a LLaVA rather than a causal LM,
    as config.json says; None otherwise (also when no config.json is found: the causal-LM path
    then says what is missing). An original-format hub id is read from its cached snapshot."""
    from transformers.utils import cached_file

    local = Path(llm)
    if not local.is_dir():
        try:
            local = Path(cached_file(llm, "config.json")).parent
        except (OSError, ValueError, TypeError):
            return None
    kind = folder_format(local)
    if kind is None:
        return None
    if kind == "llava-hf" or Path(llm).is_dir():
        return (llm if kind == "llava-hf" else local), kind
    from huggingface_hub import snapshot_download

    try:  # LLaVA's own format is no transformers model: its files are read directly
        return Path(snapshot_download(llm, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model"])), kind
    except Exception as exc:  # noqa: BLE001 - hub and cache failures come in many types
        raise DxError(f"could not get model.llm '{llm}': {first_line(exc)}. "
                      + DOWNLOAD_HINT.format(name=llm)) from None


def _load_vision(vision_config: Any, cfg: ModelConfig, dtype: torch.dtype) -> tuple[Any, list[str]]:
    """A TimmWrapperModel whose timm weights come from `cfg.vision_weights` (timm's or open_clip's,
    see model.vision_weights); a missing or misshapen tensor is an error."""
    from transformers import TimmWrapperModel

    arch = vision_config.architecture
    state, notes = vision_state_dict(arch, cfg.vision_weights, cfg.image_size, cfg.download)
    with default_dtype(dtype):
        tower = TimmWrapperModel(vision_config)
    source = cfg.vision_weights or f"timm's pretrained {arch}"
    return tower, notes + load_tower(tower.timm_model, state, source, arch)


def add_special_tokens(tokenizer: Any) -> None:
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

