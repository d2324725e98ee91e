"""The DeepSpeed side of a training loop: its config from a profile, and the engine around a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from dxcli.config import DxConfig


# ZeRO-3 keeps at most this many gathered parameters alive per GPU (DeepSpeed's default for
# stage3_max_live_parameters, written out so that the memory planner, jobs.memory, counts the same
# figure: 1e9 x 2 B = 1.86 GiB in bf16). A lower value saves memory but refetches layers more often.
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000


def deepspeed_config(cfg: DxConfig, *, lr: float, world: int, weight_decay: float | None = None,
                     zero_stage: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for one training stage, from the profile's hardware and train keys.
    `zero_stage` is the stage's own ZeRO stage (config.zero_stage_for); None -> hardware.zero_stage."""
    hw, train = cfg.hardware, cfg.train
    stage = hw.zero_stage if zero_stage is None else zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_max_live_parameters"] = ZERO3_MAX_LIVE_PARAMETERS
    # validation ties the offload keys to hardware.zero_stage; a stage with its own ZeRO stage
    # (align.zero_stage) keeps only the offloads that stage supports
    offload_optimizer = hw.offload_optimizer and stage >= 2
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if hw.offload_params and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    optimizer_params: dict[str, Any] = {"lr": lr, "weight_decay": train.weight_decay if weight_decay is None else weight_decay,
                                        "betas": [0.9, 0.999], "eps": 1e-8}
    if not offload_optimizer:
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
