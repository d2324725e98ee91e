"""The DeepSpeed side of a training loop: its config from a profile, and the engine around a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from dxcli.config import DxConfig


def deepspeed_config(cfg: DxConfig, *, lr: float, world: int, weight_decay: float | None = None) -> dict[str, Any]:
    """The DeepSpeed config for one training stage, from the profile's hardware and train keys."""
    hw, train = cfg.hardware, cfg.train
    zero: dict[str, Any] = {"stage": hw.zero_stage}
    if hw.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    # config validation guarantees ZeRO 2/3 for the optimizer and ZeRO-3 for parameter offload
    if hw.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if hw.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    optimizer_params: dict[str, Any] = {"lr": lr, "weight_decay": train.weight_decay if weight_decay is None else weight_decay,
                                        "betas": [0.9, 0.999], "eps": 1e-8}
    if not hw.offload_optimizer:
        optimizer_params["torch_adam"] = True  # no fused-op build; offload needs DeepSpeed's CPU Adam
    return {
        "train_micro_batch_size_per_gpu": hw.micro_batch,
        "gradient_accumulation_steps": hw.grad_accum,
        "train_batch_size": hw.micro_batch * hw.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": hw.precision == "bf16"},
        "fp16": {"enabled": hw.precision == "fp16", "auto_cast": False},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def initialize(model, ds_config: dict[str, Any], total_steps: int, warmup_ratio: float,
               vision_lr: float | None = None) -> tuple[Any, Any]:
    """(engine, scheduler): DeepSpeed around the trainable parameters, cosine schedule with warm-up.

    `vision_lr` gives a trainable vision tower its own learning rate (a second parameter group;
    the schedule scales both groups alike); None keeps one group at the config's lr.
    """
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    trainable: list = [p for p in model.parameters() if p.requires_grad]
    if vision_lr is not None:
        tower = {id(p) for p in model.parts()["vision"] if p.requires_grad}
        trainable = [{"params": [p for p in trainable if id(p) not in tower]},
                     {"params": [p for p in trainable if id(p) in tower], "lr": vision_lr}]
    warmup = int(warmup_ratio * total_steps)
    schedule: Callable = lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total_steps)  # noqa: E731
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config,
                                                   lr_scheduler=schedule)
    return engine, scheduler


@contextmanager
def weights_for_generation(engine) -> Iterator[None]:
    """Whole weights on every rank for one rollout; a no-op below ZeRO-3 (weights are whole there).

    Under ZeRO-3 each forward gathers every layer's partitions with a collective: decoding token
    by token would gather the model once per token, and ranks that stop at different lengths would
    wait for each other's gathers for ever. DeepSpeed's `unwrap_model_for_generation` gathers once
    and removes the partition hooks, so `generate` runs without collectives at full speed, then
    re-partitions and puts the hooks back.
    """
    if engine.zero_optimization_stage() != 3:
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield
