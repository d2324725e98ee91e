"""The one inference engine: batched generation shared by eval infer, detect and PRPO rollouts.

Image features are computed once per image and reused by every sample drawn for it; prompts are
left-padded so a batch decodes with one KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dxcli.base import template
from dxcli.model.build import image_token_count


def expanded_prompt(question: str, image_tokens: int) -> str:
    """The template's prompt with `<image>` repeated once per image token (the model fills them)."""
    return template.prompt(question).replace(template.IMAGE_TOKEN, template.IMAGE_TOKEN * image_tokens, 1)


@dataclass
class Generation:
    texts: list[str]  # one per sample: len(images) * samples_per_image, grouped by image
    token_ids: list[list[int]]  # generated ids per sample, EOS included when produced, padding removed
    head_probs: list[float]  # one per image: P(fake) from the binary head
    prompt_ids: torch.Tensor  # [n_images, P] left-padded prompt ids
    prompt_mask: torch.Tensor  # [n_images, P]
    image_features: torch.Tensor  # [n_images, N, d] projected image tokens


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: transformers' own rule in `generate`
    (GenerationMixin._prepare_position_ids_for_generation). `generate` below and PRPO's log-prob
    pass both take them from here, so a token sits at the same position in both passes."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def encode_prompts(bundle, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (one KV cache decodes the batch); the tokenizer's own
    padding side is restored, since training pads on the right with the same tokenizer."""
    tokenizer = bundle.tokenizer
    n_tokens = image_token_count(bundle.processor)
    previous, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer([expanded_prompt(q, n_tokens) for q in questions], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = previous
    return enc["input_ids"], enc["attention_mask"]


def pixel_values(bundle, images: list[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    pixels = bundle.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels.to(device=device, dtype=dtype)


@torch.no_grad()
def encode_images(bundle, images: list[Any]) -> tuple[torch.Tensor, list[float]]:
    """Projected image tokens [n, N, d] (computed once, reused by every sample) and the head's P(fake)."""
    model = bundle.model
    param = next(model.parameters())
    features = model.image_features(pixel_values(bundle, images, param.dtype, param.device))
    return features, torch.sigmoid(model.head_logits_from_features(features).float()).tolist()


@torch.no_grad()
def generate(bundle, images: list[Any], questions: list[str], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, samples_per_image: int = 1, seed: int | None = None) -> Generation:
    """Generate `samples_per_image` responses per (image, question); greedy when temperature == 0."""
    model = bundle.model
    device = next(model.parameters()).device
    ids, mask = encode_prompts(bundle, questions)
    ids, mask = ids.to(device), mask.to(device)
    features, head_probs = encode_images(bundle, images)
    embeds = model.prompt_embeds(ids, mask, image_features=features)
    if samples_per_image > 1:
        embeds = embeds.repeat_interleave(samples_per_image, dim=0)
        mask_g = mask.repeat_interleave(samples_per_image, dim=0)
    else:
        mask_g = mask
    sampling = temperature > 0
    tokenizer = bundle.tokenizer
    # a seeded draw must not move the caller's RNG (training's data order, dropout): fork it
    with torch.random.fork_rng(devices=_rng_devices(device), enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            inputs_embeds=embeds, attention_mask=mask_g, position_ids=position_ids_from_mask(mask_g),
            max_new_tokens=max_new_tokens, do_sample=sampling,
            temperature=temperature if sampling else None, top_p=top_p if sampling else None, top_k=None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    token_ids = [strip_after_eos(row.tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id) for row in out]
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in token_ids]
    return Generation(texts, token_ids, head_probs, ids, mask, features)


def strip_after_eos(row: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Keep tokens up to and including the first EOS; drop the padding after it."""
    if eos_id in row:
        return row[: row.index(eos_id) + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
