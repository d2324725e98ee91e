"""Align and instruct: one supervised recipe on DeepSpeed (METHOD.md §5).

`setup(job) -> state`, `train_step(state, batch)`, `save(state)`; `run` composes them with
resume, logging and checkpoints. Align trains the projector and binary head; instruct adds the
LLM (and, for towers without pretrained weights, the vision tower). L = L_lm + alpha * L_bin.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dxcli import config as cfgmod
from dxcli.data.records import load_records
from dxcli.model.build import image_token_count
from dxcli.model.checkpoint import build_model, load_checkpoint
from dxcli.model import checkpointing
from dxcli.model.kernels import apply_kernels, lm_forward
from dxcli.model.lora import apply_lora
from dxcli.runtime import env
from dxcli.runtime.dist import Dist, all_reduce_sum, init_distributed
from dxcli.runtime.interrupt import StopRequest
from dxcli.runtime.metrics import MetricsLog
from dxcli.runtime.progress import ProgressView
from dxcli.training import engine as ds
from dxcli.training import state as saved_state
from dxcli.training.sampler import ResumableShardSampler
from dxcli.training.sft_data import SftDataset


@dataclass
class SftJob:
    stage: str  # align | instruct
    run_dir: str
    config: str  # the run's resolved config.yaml
    records: str  # records JSONL prepared (and checked) by the launching command
    images: str
    model: str | None  # checkpoint folder; None -> the config's model section
    resume: bool = False


@dataclass
class SftState:
    """Everything the loop carries from step to step."""

    job: SftJob
    cfg: cfgmod.DxConfig
    dist: Dist
    bundle: Any
    engine: Any
    scheduler: Any
    loader: Any
    sampler: ResumableShardSampler
    alpha: float
    total_steps: int
    micro_per_epoch: int
    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    window: dict[str, float] = field(default_factory=dict)


def frozen_parts(stage: str, cfg: cfgmod.DxConfig) -> dict[str, bool]:
    """Which parts do NOT learn in this stage (`model.freeze` takes True = frozen)."""
    if stage == "align":
        return {"vision": True, "llm": True, "projector": False, "head": False}
    return {"vision": not cfg.instruct.unfreeze_vision, "llm": False, "projector": False, "head": False}


def stage_settings(stage: str, cfg: cfgmod.DxConfig) -> tuple[float, float, float]:
    """(lr, epochs, bin_alpha) for the stage; a stage's own epochs override train.epochs."""
    section = cfg.align if stage == "align" else cfg.instruct
    epochs = section.epochs if section.epochs is not None else cfg.train.epochs
    return section.lr, epochs, section.bin_alpha


def setup(job: SftJob) -> SftState:
    from torch.utils.data import DataLoader

    cfg = cfgmod.load(Path(job.config))
    dist = init_distributed()
    env.seed_everything(cfg.train.seed)
    env.set_threads(cfg.hardware.threads)
    lr, epochs, alpha = stage_settings(job.stage, cfg)
    hw = cfg.hardware
    # the model: a checkpoint (or the composed one), with this stage's trainable parts
    records = load_records(Path(job.records))
    attn = cfg.model.attn_implementation
    if job.model:
        bundle = load_checkpoint(job.model, attn_implementation=attn)
    else:  # composed in the run's precision: a 7B never passes through float32
        bundle = build_model(cfg.model, [r.answer for r in records], dtype=env.torch_dtype(hw.precision))
    apply_kernels(bundle.model, hw.kernels)  # before LoRA and DeepSpeed wrap the modules it patches
    if cfg.model.lora.rank_for(job.stage):  # never align: it trains no LLM weight
        bundle.model = apply_lora(bundle.model, cfg.model.lora)
    bundle.model.freeze(**frozen_parts(job.stage, cfg))
    if cfg.train.grad_checkpointing:
        checkpointing.enable(bundle.model)  # non-reentrant, as the DeepSpeed floor was established with
    bundle.model.config.use_cache = False
    # the data: every rank its own shard, in an order that can restart mid-epoch
    dataset = SftDataset(records, Path(job.images), bundle.tokenizer, bundle.processor.image_processor,
                         image_token_count(bundle.processor), cfg.train.max_length)
    sampler = ResumableShardSampler(len(dataset), dist.rank, dist.world, cfg.train.seed)
    loader = DataLoader(dataset, batch_size=hw.micro_batch, sampler=sampler, collate_fn=dataset.collate,
                        num_workers=hw.num_workers, persistent_workers=hw.num_workers > 0)
    micro_per_epoch = math.ceil(len(sampler.shard(0)) / hw.micro_batch)
    total_steps = max(1, math.ceil(epochs * max(1, micro_per_epoch // hw.grad_accum)))
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    # the engine: DeepSpeed around the trainable parameters
    vision_lr = cfg.instruct.vision_lr if job.stage == "instruct" else None  # config: set only with an unfrozen tower
    ds_config = ds.deepspeed_config(cfg, lr=lr, world=dist.world, zero_stage=cfgmod.zero_stage_for(cfg, job.stage))
    engine, scheduler = ds.initialize(bundle.model, ds_config,
                                      total_steps, cfg.train.warmup_ratio, vision_lr=vision_lr)
    if dist.main:
        # under ZeRO-3 a parameter's numel() is its local (released) size: ds_numel is the whole
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in bundle.model.parameters() if p.requires_grad)
        print(f"[{job.stage}] {len(dataset)} records, {dataset.truncated} truncated to "
              f"train.max_length={cfg.train.max_length}; {n_train:,} trainable parameters; "
              f"{total_steps} steps on {dist.world} process(es)", flush=True)
    return SftState(job, cfg, dist, bundle, engine, scheduler, loader, sampler, alpha, total_steps,
                    micro_per_epoch, window=empty_window())


def empty_window() -> dict[str, float]:
    """Sums over the micro-batches since the last log line, and when they started."""
    return {**dict.fromkeys(("loss", "lm_loss", "bin_loss", "tokens", "micro"), 0.0), "started": time.time()}


def train_step(state: SftState, batch: dict[str, torch.Tensor]) -> bool:
    """One micro-batch forward/backward; True when it completed an optimizer step."""
    engine = state.engine
    dtype = next(engine.module.parameters()).dtype
    # forward: L_lm from the model, L_bin from the head over the same image features
    # (hardware.kernels=liger: L_lm from the hidden states by the fused head, no logits built)
    lm_loss, out = lm_forward(engine, batch["labels"].to(engine.device), state.cfg.hardware.kernels,
                              input_ids=batch["input_ids"].to(engine.device),
                              attention_mask=batch["attention_mask"].to(engine.device),
                              pixel_values=batch["pixel_values"].to(engine.device, dtype),
                              binary_labels=batch["binary_labels"].to(engine.device))
    bin_loss = out.bin_loss
    loss = lm_loss + state.alpha * bin_loss
    # backward and step: DeepSpeed accumulates until its boundary, then steps
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    state.micro_in_epoch += 1
    for key, value in (("loss", loss), ("lm_loss", lm_loss), ("bin_loss", bin_loss)):
        state.window[key] += value.item()
    state.window["tokens"] += batch["attention_mask"].sum().item()
    state.window["micro"] += 1
    if boundary:
        state.step += 1
    return boundary


def reduce_window(window: dict[str, float], seconds: float, dist: Dist) -> dict[str, Any]:
    """Average the logged window over micro-batches and ranks; tokens/s summed over ranks."""
    loss, lm, bin_, tokens, micro = all_reduce_sum(
        [window["loss"], window["lm_loss"], window["bin_loss"], window["tokens"], window["micro"]], dist)
    micro = max(micro, 1.0)
    return {"loss": loss / micro, "lm_loss": lm / micro, "bin_loss": bin_ / micro,
            "tokens_per_s": tokens / max(seconds, 1e-9)}


def checkpoint(state: SftState) -> None:
    saved_state.save_training_state(state.engine, Path(state.job.run_dir) / "checkpoints", state.step,
                                    {"epoch": state.epoch, "micro_in_epoch": state.micro_in_epoch},
                                    state.cfg.train.keep_checkpoints, state.dist)


def resume(state: SftState, log: MetricsLog) -> None:
    client = saved_state.load_training_state(state.engine, Path(state.job.run_dir) / "checkpoints", state.dist)
    if client:
        state.step, state.epoch, state.micro_in_epoch = client["step"], client["epoch"], client["micro_in_epoch"]
        log.drop_after(state.step)
        if state.dist.main:
            print(f"[{state.job.stage}] resumed from {client['tag']} (step {state.step}, epoch {state.epoch})",
                  flush=True)


def save(state: SftState) -> Path:
    """The final checkpoint (resumable) and the model folder (gathered under ZeRO-3)."""
    checkpoint(state)
    return saved_state.finish(state.engine, state.bundle, Path(state.job.run_dir),
                              cfgmod.zero_stage_for(state.cfg, state.job.stage), state.dist, state.job.stage)


def run(job: SftJob) -> Path:
    return saved_state.run_recipe(job, setup, resume, train_loop, save)


def train_loop(state: SftState, log: MetricsLog) -> None:
    """Optimizer steps up to `total_steps`: metrics every `log_every`, checkpoints when due."""
    job = state.job
    progress = ProgressView(state.total_steps, job.stage, state.dist.main, start=state.step)
    state.engine.train()
    with StopRequest(state.dist, state.cfg.train.save_every_minutes) as stop:
        while state.step < state.total_steps:
            state.sampler.set_position(state.epoch, state.micro_in_epoch * state.cfg.hardware.micro_batch)
            for batch in state.loader:
                if train_step(state, batch):
                    after_step(state, log, progress, stop)
                if state.step >= state.total_steps:
                    break
            else:
                state.epoch, state.micro_in_epoch = state.epoch + 1, 0
    progress.close()


def after_step(state: SftState, log: MetricsLog, progress: ProgressView, stop: StopRequest) -> None:
    """Log the window, then checkpoint or stop when due."""
    train, now = state.cfg.train, time.time()
    if state.step % train.log_every == 0 or state.step == state.total_steps:
        row = reduce_window(state.window, now - state.window.pop("started", now), state.dist)
        row.update(step=state.step, epoch=state.epoch + state.micro_in_epoch / state.micro_per_epoch,
                   lr=state.scheduler.get_last_lr()[0])
        log.write(row)
        progress.update(state.step, {k: row[k] for k in ("loss", "lm_loss", "bin_loss", "lr", "tokens_per_s")})
        state.window = empty_window()
    saved_state.checkpoint_or_stop(step=state.step, save_every=train.save_every, run_dir=Path(state.job.run_dir),
                                   label=state.job.stage, dist=state.dist, save=lambda: checkpoint(state),
                                   progress=progress, stop=stop)
