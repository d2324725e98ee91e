"""DX-LLaVA: the model class and the ways to get one (tiny preset, composition, checkpoint)."""

from dxcli.model.build import (
    ModelBundle,
    build_model,
    build_tiny,
    compose,
    image_token_count,
    load_checkpoint,
    make_processor,
    param_summary,
    save_checkpoint,
    train_tokenizer,
)
from dxcli.model.dxllava import DxLlavaConfig, DxLlavaForConditionalGeneration, DxLlavaOutput

__all__ = [
    "DxLlavaConfig",
    "DxLlavaForConditionalGeneration",
    "DxLlavaOutput",
    "ModelBundle",
    "build_model",
    "build_tiny",
    "compose",
    "image_token_count",
    "load_checkpoint",
    "make_processor",
    "param_summary",
    "save_checkpoint",
    "train_tokenizer",
]
