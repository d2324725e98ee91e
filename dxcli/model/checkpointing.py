"""Activation (gradient) checkpointing of the LLM's decoder layers, and the DeepSpeed release it
needs under ZeRO-3.

ZeRO-3 + non-reentrant checkpointing (`use_reentrant=False`, transformers 5's default) + frozen
weights inside the checkpointed layers (align: the whole LLM; LoRA: the LLM's own weights) fails in
the first backward on DeepSpeed before 0.19.3 with `CheckpointError: ... saved metadata {'shape':
[4096]} vs recomputed metadata {'shape': [0]}`: the recompute re-fires ZeRO-3's forward hooks,
whose release re-partitions a frozen weight in place while torch's checkpoint still holds it
undetached (huggingface/transformers#47254). DeepSpeed PR #8148 ("Z3: Support for activation
ckpt with frozen params", merge commit a31eb3165126, first released in v0.19.3; tag containment
checked in DeepSpeed's git history) keeps such weights gathered until their backward. v0.19.2
fails the 2-process align of tests/test_zero3_checkpointing.py with that error; v0.19.3 passes it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from dxcli.base.errors import DxError

DEEPSPEED_FLOOR = "0.19.3"  # first release with deepspeedai/DeepSpeed#8148; pyproject.toml pins it too
DEEPSPEED_FIX = "deepspeedai/DeepSpeed#8148"
CHECKPOINT_KWARGS = {"use_reentrant": False}  # explicit: what the floor was established with


def enable(model: Any) -> list[str]:
    """Checkpoint every decoder layer of the LLM (non-reentrant); returns the checkpointed layers'
    names. transformers' `activation_checkpointing_enable` where it exists (5.x renamed it;
    `gradient_checkpointing_enable` warns), either way with `use_reentrant=False` spelled out."""
    on = getattr(model, "activation_checkpointing_enable", None)
    if on is not None:
        on(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    return checkpointed_layers(model)


def checkpointed_layers(model: Any) -> list[str]:
    """Names of the modules that checkpoint themselves in training (transformers'
    GradientCheckpointingLayer with `gradient_checkpointing` on): the LLM's decoder layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [name for name, module in model.named_modules()
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing]


def installed_deepspeed() -> str | None:
    """The installed DeepSpeed's version (package metadata: DeepSpeed itself is not imported)."""
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None


def below_floor(version: str) -> bool:
    from packaging.version import InvalidVersion, Version  # a dependency of transformers and DeepSpeed

    try:
        return Version(version) < Version(DEEPSPEED_FLOOR)
    except InvalidVersion:
        return False  # an unparseable local build: let it run rather than guess


def check_deepspeed(zero_stage: int, grad_checkpointing: bool, version: str | None = None) -> None:
    """DxError (one line) when a run would use ZeRO-3 with gradient checkpointing on a DeepSpeed
    without the frozen-weights recompute fix; `version` defaults to the installed one. Call before
    launching workers: the failure otherwise comes from every rank in the first backward."""
    if zero_stage != 3 or not grad_checkpointing:
        return
    version = version if version is not None else installed_deepspeed()
    if version is None or not below_floor(version):
        return
    raise DxError(
        f"hardware.zero_stage=3 with train.grad_checkpointing=true needs deepspeed>={DEEPSPEED_FLOOR} "
        f"(installed {version}; {DEEPSPEED_FIX} fixes checkpointing with frozen weights): "
        f"pip install 'deepspeed>={DEEPSPEED_FLOOR}', or --set train.grad_checkpointing=false")
