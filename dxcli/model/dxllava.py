"""DX-LLaVA: transformers' FastVlm (LLaVA with a timm ConvNeXt tower) plus a binary real/fake head.

FastVlm already flattens the tower's last-stage map into tokens and projects them
(Linear-GELU-Linear); this subclass only adds the head over the mean-pooled projected tokens,
a few helpers for reusing image features across samples, and freezing that keeps a frozen
tower in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import FastVlmConfig, FastVlmForConditionalGeneration
from transformers.models.fast_vlm.modeling_fast_vlm import FastVlmCausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple


# peft names every LoRA tensor lora_A/lora_B/...: how `parts` tells adapters from the LLM's own weights
ADAPTER_MARK = "lora_"


class DxLlavaConfig(FastVlmConfig):
    """FastVlm's config plus the width of the binary head's hidden layer.

    It keeps FastVlm's model type, so a saved dx checkpoint opens with plain transformers
    (`AutoModelForImageTextToText`, no remote code): that loads everything but the binary head,
    which it reports as unused tensors; dx reads the head too. `head_hidden` in config.json is
    what marks the folder as a dx checkpoint.

    Two fields keep what a model imported from the original code computes (METHOD.md §2;
    dxcli/model/original.py); their defaults are dx's own behaviour:
    `head_clamp`: the head's input tokens are clamped to [-head_clamp, head_clamp] before the mean
    (the original clamps at 10; None = no clamp). Only the head sees the clamp: the LLM still gets
    the projected tokens as they are.
    `image_aspect_ratio`: "crop" (shortest side resized, centre crop) or "pad" (padded to a square
    with the mean colour first, LLaVA's `expand2square`); the saved image processor does it, this
    field records it so a mismatching processor is caught on load.
    """

    head_hidden: int = 512
    head_clamp: float | None = None
    image_aspect_ratio: str = "crop"


@dataclass
class DxLlavaOutput(FastVlmCausalLMOutputWithPast):
    """FastVlm's output plus the binary head: `head_logits` [B] and `bin_loss` (BCE, when labelled)."""

    head_logits: torch.FloatTensor | None = None
    bin_loss: torch.FloatTensor | None = None


def binary_loss(head_logits: torch.Tensor, binary_labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over the images with a known label (-1 marks unknown; then 0, kept in the graph)."""
    known = binary_labels >= 0
    if not known.any():
        return head_logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(head_logits[known].float(), binary_labels[known].float())


class DxLlavaForConditionalGeneration(FastVlmForConditionalGeneration):
    config_class = DxLlavaConfig
    config: DxLlavaConfig

    def __init__(self, config: DxLlavaConfig):
        super().__init__(config)
        width = config.text_config.hidden_size
        self.binary_head = nn.Sequential(
            nn.Linear(width, config.head_hidden), nn.ReLU(), nn.Linear(config.head_hidden, 1)
        )
        # Second post_init: initialises only the new head (modules already initialised are skipped).
        self.post_init()

    # ------------------------------------------------------------------ image features and head

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens [B, N, d] (N = (H/32) * (W/32) for ConvNeXt)."""
        return self.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    def head_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Binary (fake) logit per image [B] from projected image tokens [B, N, d]."""
        if self.config.head_clamp is not None:  # an imported original model's head (see DxLlavaConfig)
            features = features.clamp(-self.config.head_clamp, self.config.head_clamp)
        return self.binary_head(features.mean(dim=1)).squeeze(-1)

    def prompt_embeds(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image features written at the `<image>` positions.

        Pass `pixel_values` or precomputed `image_features` (one image per row of `input_ids`);
        the result feeds `generate(inputs_embeds=..., attention_mask=...)`. `attention_mask` is
        only checked for shape: padding positions keep their (ignored) token embeddings.
        """
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        embeds = self.get_input_embeddings()(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        if image_features is None:
            return embeds
        image_features = image_features.to(embeds.device, embeds.dtype)
        mask = self.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=image_features)
        return embeds.masked_scatter(mask, image_features)

    # ------------------------------------------------------------------ forward

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        binary_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> DxLlavaOutput:
        """FastVlm's forward (LM loss when `labels`) plus `head_logits` whenever an image was
        encoded, and `bin_loss` when `binary_labels` (1 = fake, 0 = real, -1 = unknown) are given."""
        out = super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        head_logits = bin_loss = None
        if out.image_outputs is not None:
            head_logits = self.head_logits_from_features(out.image_outputs.pooler_output)
        if binary_labels is not None:
            if head_logits is None:
                raise ValueError("binary_labels need an image (pixel_values or mm_encoder_outputs)")
            bin_loss = binary_loss(head_logits, binary_labels.to(head_logits.device))
        return DxLlavaOutput(**out, head_logits=head_logits, bin_loss=bin_loss)

    # ------------------------------------------------------------------ freezing

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part: vision, projector, llm (decoder, embeddings, lm_head), head, and the
        LoRA adapters on the LLM (dxcli.model.lora; empty without)."""
        llm = [*self.model.language_model.named_parameters(), *self.lm_head.named_parameters()]
        return {
            "vision": list(self.model.vision_tower.parameters()),
            "projector": list(self.model.multi_modal_projector.parameters()),
            "llm": [p for name, p in llm if ADAPTER_MARK not in name],
            "head": list(self.binary_head.parameters()),
            "adapters": [p for name, p in llm if ADAPTER_MARK in name],
        }

    def image_side(self) -> list[nn.Module]:
        """The modules `image_features` and the head run through: tower, projector, head."""
        return [self.model.vision_tower, self.model.multi_modal_projector, self.binary_head]

    def freeze(self, vision: bool, llm: bool, projector: bool, head: bool) -> None:
        """True freezes a part (requires_grad False), False makes it trainable.

        With LoRA adapters on the LLM, a trainable LLM means trainable adapters: the LLM's own
        weights stay frozen (they are also PRPO's KL reference, adapters off).
        A frozen vision tower is switched to eval mode at once and stays there (see `train`).
        When the tower trains, timm's classifier head stays frozen: `forward_features` never
        reaches it, and parameters without gradients upset distributed optimizers.
        """
        has_adapters = bool(self.parts()["adapters"])
        flags = {"vision": vision, "llm": llm or has_adapters, "projector": projector, "head": head,
                 "adapters": llm}
        for part, params in self.parts().items():
            for param in params:
                param.requires_grad_(not flags[part])
        if not vision:
            classifier = getattr(self.model.vision_tower.timm_model, "head", None)
            if isinstance(classifier, nn.Module):
                classifier.requires_grad_(False)
        self.train(self.training)

    @property
    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.vision_tower.parameters())

    def train(self, mode: bool = True):
        """Like nn.Module.train, but a frozen vision tower stays in eval mode (no drop-path)."""
        super().train(mode)
        if mode and self.vision_frozen:
            self.model.vision_tower.eval()
        return self
