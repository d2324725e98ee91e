"""Align and instruct: one supervised training loop on DeepSpeed, read top to bottom.

setup (config, process group, model, data, engine) -> resume -> train (log, checkpoint) -> save.
Align trains the projector and binary head; instruct adds the LLM (and, for towers without
pretrained weights, the vision tower). L = L_lm + alpha * L_bin in both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dxcli import config as cfgmod
from dxcli.training import runtime



@dataclass
class SftJob:
    stage: str  # align | instruct
    run_dir: str
    records: str  # records JSONL prepared (and checked) by the launching command
    images: str
    model: str | None  # checkpoint folder; None -> the config's model section
    resume: bool = False


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


def binary_loss(head_logits, binary_labels):
    """BCE-with-logits over records with a known label (-1 marks unknown)."""
    import torch

    known = binary_labels >= 0
    if not known.any():
        return head_logits.sum() * 0.0
    return torch.nn.functional.binary_cross_entropy_with_logits(
        head_logits[known].float(), binary_labels[known].float())


def run(job: SftJob) -> Path:
    # ------------------------------------------------------------------ setup
    import deepspeed
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    from dxcli.data.records import load_records
    from dxcli.model import build_model, image_token_count, load_checkpoint
    from dxcli.training.sft_data import ResumableShardSampler, SftDataset

    run_dir = Path(job.run_dir)
    cfg = cfgmod.load(run_dir / "config.yaml")
    dist = runtime.init_distributed()
    runtime.seed_everything(cfg.train.seed)
    runtime.set_threads(cfg.hardware.threads)
    lr, epochs, alpha = stage_settings(job.stage, cfg)
    hw = cfg.hardware

    records = load_records(Path(job.records))
    bundle = load_checkpoint(job.model) if job.model else build_model(cfg.model, [r.answer for r in records])
    model = bundle.model
    model.freeze(**frozen_parts(job.stage, cfg))
    if cfg.train.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False

    dataset = SftDataset(records, Path(job.images), bundle.tokenizer, bundle.processor.image_processor,
                         image_token_count(bundle.processor), cfg.train.max_length)
    sampler = ResumableShardSampler(len(dataset), dist.rank, dist.world, cfg.train.seed)
    loader = DataLoader(dataset, batch_size=hw.micro_batch, sampler=sampler, collate_fn=dataset.collate,
                        num_workers=hw.num_workers, persistent_workers=hw.num_workers > 0)
    micro_per_epoch = math.ceil(len(sampler.shard(0)) / hw.micro_batch)
    steps_per_epoch = max(1, micro_per_epoch // hw.grad_accum)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    warmup = int(cfg.train.warmup_ratio * total_steps)

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=runtime.deepspeed_config(cfg, lr=lr),
        lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total_steps))

    log = runtime.MetricsLog(run_dir / "metrics.jsonl", dist.main)
    ckpt_dir = run_dir / "checkpoints"
    if dist.main:
        n_train = sum(p.numel() for p in trainable)
        print(f"[{job.stage}] {len(dataset)} records, {dataset.truncated} truncated to "
              f"train.max_length={cfg.train.max_length}; {n_train:,} trainable parameters; "
              f"{total_steps} steps on {dist.world} process(es)", flush=True)

    # ------------------------------------------------------------------ resume
    step, epoch, micro_in_epoch = 0, 0, 0
    client = runtime.load_training_state(engine, ckpt_dir) if job.resume else None
    if client:
        step, epoch, micro_in_epoch = client["step"], client["epoch"], client["micro_in_epoch"]
        if dist.main:
            print(f"[{job.stage}] resumed from {client['tag']} (step {step}, epoch {epoch})", flush=True)

    def save_state() -> None:
        runtime.save_training_state(engine, ckpt_dir, step, {"epoch": epoch, "micro_in_epoch": micro_in_epoch},
                                    cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ train
    engine.train()
    progress = runtime.ProgressView(total_steps, job.stage, dist.main, start=step)
    stop_after = runtime.stop_after_step()
    window: dict[str, float] = {"loss": 0.0, "lm_loss": 0.0, "bin_loss": 0.0, "tokens": 0.0, "micro": 0.0}
    window_start = time.time()
    while step < total_steps:
        sampler.set_position(epoch, micro_in_epoch * hw.micro_batch)
        for batch in loader:
            out = engine(input_ids=batch["input_ids"].to(engine.device),
                         attention_mask=batch["attention_mask"].to(engine.device),
                         pixel_values=batch["pixel_values"].to(engine.device, next(engine.module.parameters()).dtype),
                         labels=batch["labels"].to(engine.device))
            bin_loss = binary_loss(out.head_logits, batch["binary_labels"].to(engine.device))
            loss = out.loss + alpha * bin_loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            micro_in_epoch += 1
            window["loss"] += loss.item()
            window["lm_loss"] += out.loss.item()
            window["bin_loss"] += bin_loss.item()
            window["tokens"] += batch["attention_mask"].sum().item()
            window["micro"] += 1
            if not boundary:
                continue
            step += 1
            if step % cfg.train.log_every == 0 or step == total_steps:
                row = reduce_window(window, time.time() - window_start, dist.world)
                row.update(step=step, epoch=epoch + micro_in_epoch / micro_per_epoch, lr=scheduler.get_last_lr()[0])
                log.write(row)
                progress.update(step, {k: row[k] for k in ("loss", "lm_loss", "bin_loss", "lr", "tokens_per_s")})
                window = dict.fromkeys(window, 0.0)
                window_start = time.time()
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == stop_after:
                save_state()
            if step == stop_after:
                progress.close()
                raise SystemExit(f"[{job.stage}] stopped after step {step} ({runtime.STOP_AFTER_ENV})")
            if step >= total_steps:
                break
        else:
            epoch, micro_in_epoch = epoch + 1, 0
    progress.close()
    save_state()

    # ------------------------------------------------------------------ save
    out_dir = run_dir / "model"
    runtime.save_final_model(engine, bundle, out_dir, hw.zero_stage)
    if dist.main:
        print(f"[{job.stage}] saved {out_dir}", flush=True)
    return out_dir


def reduce_window(window: dict[str, float], seconds: float, world: int) -> dict[str, Any]:
    """Average the logged window over micro-batches and ranks; tokens/s summed over ranks."""
    import torch

    values = torch.tensor([window["loss"], window["lm_loss"], window["bin_loss"], window["tokens"], window["micro"]],
                          dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(values)
    loss, lm, bin_, tokens, micro = values.tolist()
    micro = max(micro, 1.0)
    return {"loss": loss / micro, "lm_loss": lm / micro, "bin_loss": bin_ / micro,
            "tokens_per_s": tokens / max(seconds, 1e-9)}
