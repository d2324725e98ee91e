"""DX-LLaVA: the model class and the ways to get one (tiny preset, composition, checkpoint)."""

from transformers.utils import logging as _hf_logging

# dx draws its own progress; transformers' per-file bars would interleave with it
_hf_logging.disable_progress_bar()

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
