"""The one inference engine: batched generation shared by eval infer, detect and PRPO rollouts.

Image features are computed once per image and reused by every sample drawn for it; prompts are
left-padded so a batch decodes with one KV cache.

Decoding uses transformers' dynamic KV cache unless `compiled=True` (`hardware.compiled_decode`):
then a static cache whose length is rounded up to a bucket, and transformers' compiled decoding
step (see `decode_kwargs`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import CompileConfig

from dxcli.base import template
from dxcli.model.build import image_token_count

log = logging.getLogger(__name__)

# Static-cache lengths are rounded up to a multiple of this, so that the next batch's prompt (PRPO's
# questions differ step to step) reuses the compiled decoding graph instead of recompiling for
# each new prompt_len + max_new_tokens; the price is at most DECODE_BUCKET - 1 idle cache slots.
DECODE_BUCKET = 256
# where transformers compiles the decoding step of a static cache by itself
# (GenerationMixin._valid_auto_compile_criteria); elsewhere only when forced
COMPILING_DEVICES = ("cuda", "xpu", "neuron", "tpu")


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
             top_p: float = 1.0, samples_per_image: int = 1, seed: int | None = None, compiled: bool = False,
             compile_backend: str | Callable | None = None) -> Generation:
    """Generate `samples_per_image` responses per (image, question); greedy when temperature == 0.

    `compiled`: a bucketed static cache and a compiled decoding step (`decode_kwargs`), the same
    tokens as the dynamic cache up to float rounding; `compile_backend` forces the compile (tests
    and the CPU smoke bench use "eager")."""
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
    decoding = decode_kwargs(device, ids.shape[1], max_new_tokens, compiled=compiled, backend=compile_backend)
    # a seeded draw must not move the caller's RNG (training's data order, dropout): fork it
    with torch.random.fork_rng(devices=_rng_devices(device), enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            inputs_embeds=embeds, attention_mask=mask_g, position_ids=position_ids_from_mask(mask_g),
            max_new_tokens=max_new_tokens, do_sample=sampling,
            temperature=temperature if sampling else None, top_p=top_p if sampling else None, top_k=None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            **decoding)  # keyword arguments: transformers applies them to a copy of model.generation_config
    token_ids = [strip_after_eos(row.tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id) for row in out]
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in token_ids]
    return Generation(texts, token_ids, head_probs, ids, mask, features)


def static_cache_len(prompt_len: int, max_new_tokens: int, bucket: int = DECODE_BUCKET) -> int:
    """prompt_len + max_new_tokens rounded up to a multiple of `bucket`."""
    return -(-(prompt_len + max_new_tokens) // bucket) * bucket


def decode_kwargs(device: torch.device, prompt_len: int, max_new_tokens: int, *, compiled: bool,
                  backend: str | Callable | None = None) -> dict[str, Any]:
    """`model.generate`'s cache and compile arguments: none (the dynamic cache) unless `compiled`.

    Compiled: a static cache of `static_cache_len` slots and CompileConfig(dynamic=False), so the
    decoding step is one graph per (batch size, cache length), CUDA graphs included (inductor's
    reduce-overhead). Transformers also keeps the largest cache length a model has used
    (`_previous_max_cache_length`), so a shorter bucket later reuses the larger graph: a run makes
    one graph per batch size (PRPO: images_per_step x G; eval infer: batch_size and its last,
    smaller batch) and per larger bucket reached. Dynamo's recompile limit (8 per function) is
    far off; past it, torch logs a warning and runs eager. Measured (tests/gpu/bench_decode.py, one
    H200, 7B-shaped, G=8, 128 tokens): 30.3 ms per step dynamic, 8.0 ms compiled, after a 37 s
    compile on the first call. On a device transformers does not compile on (the CPU) the static
    cache runs uncompiled, said once, unless `backend` (a torch.compile backend: a name or a
    callable) forces a compile with that backend on any device."""
    if not compiled:
        return {}
    config = None
    if backend is not None:
        # a backend other than inductor takes no inductor mode
        mode = "reduce-overhead" if backend == "inductor" else None
        config = CompileConfig(dynamic=False, backend=backend, mode=mode)
        config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
    elif device.type in COMPILING_DEVICES:
        config = CompileConfig(dynamic=False)  # inductor, reduce-overhead
    else:
        _say_uncompiled(device.type)
    return dict(cache_implementation="static", max_cache_len=static_cache_len(prompt_len, max_new_tokens),
                compile_config=config, disable_compile=config is None)


@functools.cache
def _say_uncompiled(device_type: str) -> None:
    log.warning("compiled decoding: transformers compiles the decoding step on accelerators only; on %s the static "
                "cache runs uncompiled (the same tokens, no speed-up)", device_type)


def strip_after_eos(row: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Keep tokens up to and including the first EOS; drop the padding after it."""
    if eos_id in row:
        return row[: row.index(eos_id) + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
