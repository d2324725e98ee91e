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


IMAGE_ASPECT_RATIOS = ("crop", "pad")  # DxLlavaConfig.image_aspect_ratio


def make_processor(tokenizer: Any, image_size: int, patch_size: int, aspect_ratio: str = "crop") -> Any:
    """LlavaProcessor: RGB, shortest side -> image_size (bicubic), center crop, CLIP mean/std;
    `<image>` expands to (image_size / patch_size)^2 tokens. `aspect_ratio` "pad" first pads the
    image to a square with the mean colour (LLaVA's expand2square, METHOD.md §2): transformers'
    LlavaImageProcessor with do_pad, saved as such, so plain transformers pads too."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor
    from transformers.image_utils import PILImageResampling

    if aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise DxError(f"image aspect ratio must be one of {', '.join(IMAGE_ASPECT_RATIOS)}, got '{aspect_ratio}'")
    # "crop" keeps CLIPImageProcessor: every model made before padding existed saved that class
    image_class, extra = (LlavaImageProcessor, {"do_pad": True}) if aspect_ratio == "pad" else (CLIPImageProcessor, {})
    image_processor = image_class(
        **extra,
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


def vision_config_for(arch: str, model_args: dict, image_size: int) -> tuple[Any, int]:
    """TimmWrapperConfig with hidden_size set by hand (the wrapper does not derive it); + stride."""
    from transformers import TimmWrapperConfig

    width, stride = _timm_shape(arch, model_args)
    _check_image_size(image_size, stride)
    # do_pooling off: FastVlm uses the unpooled last-stage map, pooling would be wasted work.
    config = TimmWrapperConfig(architecture=arch, model_args=model_args or None, hidden_size=width, do_pooling=False)
    return config, stride


def dx_config(vision_config: Any, text_config: Any, image_token_id: int, image_tokens: int,
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
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
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
    vision_config, stride = vision_config_for(vision_arch, vision_args, image_size)
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    text_config.pad_token_id = tokenizer.pad_token_id
    config = dx_config(vision_config, text_config, tokenizer.convert_tokens_to_ids(template.IMAGE_TOKEN),
                        (image_size // stride) ** 2, head_hidden)
    config.dtype = dtype or torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        model = DxLlavaForConditionalGeneration(config)
    set_generation_tokens(model, tokenizer)
    return ModelBundle(model, tokenizer, make_processor(tokenizer, image_size, stride))


def set_generation_tokens(model: DxLlavaForConditionalGeneration, tokenizer: Any) -> None:
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    # A sampled `<image>` would later be taken for an image slot (prompt_embeds, log-probs).
    gen.suppress_tokens = [model.config.image_token_id]


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
