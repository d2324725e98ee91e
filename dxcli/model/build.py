"""Getting a DX-LLaVA: the offline tiny preset, composition from a timm tower + a causal LM,
or a dx checkpoint folder; plus the processor (CLIP-style preprocessing + `<image>` expansion).

Composition verifies that pretrained weights really loaded: a missing LLM or vision tensor is a
DxError, never a silently random-initialised part.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dxcli.base import template
from dxcli.base.errors import DxError
from dxcli.config import ModelConfig
from dxcli.model.dxllava import DxLlavaConfig, DxLlavaForConditionalGeneration

log = logging.getLogger(__name__)

TINY_VISION_ARCH = "convnext_atto"  # the tiny preset's tower; depths/dims come from the config
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", template.IMAGE_TOKEN]
# METHOD.md §2: CLIP normalisation (OpenAI CLIP values).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")


@dataclass
class ModelBundle:
    model: DxLlavaForConditionalGeneration
    tokenizer: Any  # a transformers tokenizer (fast)
    processor: Any  # transformers.LlavaProcessor
    notes: list[str] = field(default_factory=list)  # load report lines worth showing the user


# ---------------------------------------------------------------- processor


def make_processor(tokenizer: Any, image_size: int, patch_size: int) -> Any:
    """LlavaProcessor: RGB, shortest side -> image_size (bicubic), center crop, CLIP mean/std;
    `<image>` expands to (image_size / patch_size)^2 tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor
    from transformers.image_utils import PILImageResampling

    image_processor = CLIPImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token=template.IMAGE_TOKEN,
        chat_template=template.CHAT_TEMPLATE,
    )


def image_token_count(processor_or_cfg: Any) -> int:
    """Image tokens per `<image>`: from a LlavaProcessor, a DxLlavaConfig or a ModelConfig."""
    if isinstance(processor_or_cfg, DxLlavaConfig):
        return processor_or_cfg.image_seq_length
    if isinstance(processor_or_cfg, ModelConfig):
        arch = TINY_VISION_ARCH if processor_or_cfg.preset == "tiny" else processor_or_cfg.vision
        side = processor_or_cfg.image_size // vision_stride(arch)
        return side * side
    crop = processor_or_cfg.image_processor.crop_size
    patch = processor_or_cfg.patch_size
    return (crop["height"] // patch) * (crop["width"] // patch)


def vision_stride(arch: str, model_args: dict | None = None) -> int:
    """Total downsampling of a timm model's last stage (32 for ConvNeXt), read off a meta copy."""
    return _timm_shape(arch, model_args or {})[1]


def timm_on_meta(arch: str, model_args: dict) -> tuple[Any, int]:
    """(the timm model without weights, its last-stage stride): shapes only, nothing allocated."""
    import timm

    try:
        with torch.device("meta"):
            net = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
    except RuntimeError as exc:
        raise DxError(f"unknown timm model '{arch}': {exc}") from None
    info = getattr(net, "feature_info", None)
    return net, info[-1]["reduction"] if info else 32


def _timm_shape(arch: str, model_args: dict) -> tuple[int, int]:
    """(last-stage width, last-stage stride) of a timm architecture."""
    net, stride = timm_on_meta(arch, model_args)
    return net.num_features, stride


def _check_image_size(image_size: int, stride: int) -> None:
    if image_size < stride or image_size % stride:
        raise DxError(f"model.image_size must be a multiple of the vision stride {stride}, got {image_size}")


# ---------------------------------------------------------------- configs


def _vision_config(arch: str, model_args: dict, image_size: int) -> tuple[Any, int]:
    """TimmWrapperConfig with hidden_size set by hand (the wrapper does not derive it); + stride."""
    from transformers import TimmWrapperConfig

    width, stride = _timm_shape(arch, model_args)
    _check_image_size(image_size, stride)
    # do_pooling off: FastVlm uses the unpooled last-stage map, pooling would be wasted work.
    config = TimmWrapperConfig(architecture=arch, model_args=model_args or None, hidden_size=width, do_pooling=False)
    return config, stride


def _dx_config(vision_config: Any, text_config: Any, image_token_id: int, image_tokens: int,
               head_hidden: int) -> DxLlavaConfig:
    return DxLlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=image_tokens,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        head_hidden=head_hidden,
    )


# ---------------------------------------------------------------- tiny preset


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on `texts` + the template's fixed text; Llama-like specials
    (`<s>` prepended, `</s>` eos, `<pad>`, `<image>`). Deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [template.SYSTEM, template.prompt(template.DEFAULT_QUESTION),
              "### Answer: real", "### Answer: fake", *texts]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": template.IMAGE_TOKEN},
    )


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Create parameters in `dtype` (as from_pretrained does): unlike `model.to(dtype)` this keeps
    float32 buffers such as RoPE's inv_freq in float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_tiny(cfg: ModelConfig, texts: list[str], seed: int = 0,
               dtype: torch.dtype | None = None) -> ModelBundle:
    """The offline preset: random-init ConvNeXt + small Llama + a BPE trained on `texts`."""
    from transformers import LlamaConfig

    tiny = cfg.tiny
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    # layer-scale 1.0 (timm: 1e-6): a random tower whose blocks start near identity gives features
    # too small and too alike for the binary head to learn from in minutes
    model_args = {"depths": tuple(tiny.vision_depths), "dims": tuple(tiny.vision_dims), "ls_init_value": 1.0}
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        tie_word_embeddings=False,
    )
    bundle = build_random(TINY_VISION_ARCH, model_args, text_config, tokenizer, cfg.image_size, cfg.head_hidden,
                          seed=seed, dtype=dtype)
    summarise(bundle, f"tiny preset ({TINY_VISION_ARCH} {tiny.vision_dims}, random init)")
    return bundle


def build_random(vision_arch: str, vision_args: dict, text_config: Any, tokenizer: Any, image_size: int,
                 head_hidden: int, *, seed: int = 0, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> ModelBundle:
    """A random-init DX-LLaVA of any shape: timm tower `vision_arch` (no pretrained weights) + a
    Llama-family `text_config` (its vocab may exceed the tokenizer's), created on `device` in
    `dtype`. The tiny preset, and real-shaped models for speed and memory checks (tests/gpu) with
    nothing downloaded; a 7B is initialised on the GPU rather than in CPU float32."""
    vision_config, stride = _vision_config(vision_arch, vision_args, image_size)
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    text_config.pad_token_id = tokenizer.pad_token_id
    config = _dx_config(vision_config, text_config, tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN),
                        (image_size // stride) ** 2, head_hidden)
    config.dtype = dtype or torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        model = DxLlavaForConditionalGeneration(config)
    _set_generation_tokens(model, tokenizer)
    return ModelBundle(model, tokenizer, make_processor(tokenizer, image_size, stride))


# ---------------------------------------------------------------- composition


def compose(cfg: ModelConfig, dtype: torch.dtype | None = None, seed: int = 0) -> ModelBundle:
    """timm tower (`cfg.vision`, weights from `cfg.vision_weights`) + causal LM (`cfg.llm`);
    `<image>` (and a pad token if missing) added; projector and head fresh."""
    with hub_access(cfg.download):
        tokenizer = _load_tokenizer(cfg.llm)
        llm, llm_notes = _load_llm(cfg.llm, dtype)
        vision_config, stride = _vision_config(cfg.vision, {}, cfg.image_size)
        tower, vision_notes = _load_vision(vision_config, cfg.vision_weights, llm.dtype)
    _add_special_tokens(tokenizer)

    config = _dx_config(vision_config, llm.config, tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN),
                        (cfg.image_size // stride) ** 2, cfg.head_hidden)
    model = _assemble(config, tower, llm, seed)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config = llm.generation_config
    _set_generation_tokens(model, tokenizer)
    bundle = ModelBundle(model, tokenizer, make_processor(tokenizer, cfg.image_size, stride),
                         notes=llm_notes + vision_notes)
    summarise(bundle, f"composed: vision {cfg.vision} + llm {cfg.llm}")
    return bundle


def _assemble(config: DxLlavaConfig, tower: Any, llm: Any, seed: int) -> DxLlavaForConditionalGeneration:
    """Build the skeleton on the meta device (no 7B random init), then plug in the loaded parts
    and initialise only the projector and the head."""
    config.dtype = llm.dtype
    with torch.device("meta"), _default_dtype(llm.dtype):
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
    with _default_dtype(dtype):
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


def _set_generation_tokens(model: DxLlavaForConditionalGeneration, tokenizer: Any) -> None:
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    # A sampled `<image>` would later be taken for an image slot (prompt_embeds, log-probs).
    gen.suppress_tokens = [model.config.image_token_id]


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__


def preview(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def unexpected_note(what: str, unexpected: Any) -> list[str]:
    keys = sorted(unexpected or [])
    if not keys:
        return []
    note = f"{what}: {len(keys)} unused tensors ignored ({preview(keys)})"
    log.warning(note)
    return [note]


def param_summary(model: DxLlavaForConditionalGeneration) -> str:
    """One line: parameters per part, with how many train."""
    parts = []
    for part, params in model.parts().items():
        if not params:  # no adapters without LoRA
            continue
        unique = {id(p): p for p in params}.values()  # tied weights count once
        total = sum(p.numel() for p in unique)
        trainable = sum(p.numel() for p in unique if p.requires_grad)
        parts.append(f"{part} {total / 1e6:.2f}M" + ("" if trainable == total else f" ({trainable / 1e6:.2f}M train)"))
    return "params: " + ", ".join(parts)


def summarise(bundle: ModelBundle, origin: str) -> None:
    line = f"DX-LLaVA {origin}; {param_summary(bundle.model)}; {image_token_count(bundle.processor)} image tokens"
    log.info(line)
    bundle.notes.append(line)
