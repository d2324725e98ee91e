"""PRPO (and the GRPO baseline): one RL recipe on DeepSpeed (METHOD.md §7-§13).

Each step: a batch of images -> G samples per image from the CURRENT weights (`rollout`: one
batched generate; image features computed once and reused by all G samples and by the log-prob
pass) -> advantages (`dxcli.rl.advantages`) -> log-probs WITH the image -> clipped surrogate
(+ k3 KL when beta > 0) -> one optimizer step. With one PPO epoch the old log-probs equal the
current ones, detached: no extra forward pass. The vision tower, projector and head stay frozen.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dxcli import config as cfgmod
from dxcli.base.images import load_rgb
from dxcli.base.jsonio import dumps_line
from dxcli.data.records import load_records
from dxcli.model.checkpoint import load_checkpoint
from dxcli.model.lora import apply_lora
from dxcli.rl.objective import policy_loss
from dxcli.rl.rewards import ClipScorer, load_lexicon
from dxcli.runtime import env
from dxcli.runtime.dist import Dist, init_distributed, mean_over_ranks
from dxcli.runtime.metrics import MetricsLog
from dxcli.runtime.progress import ProgressView
from dxcli.training import engine as ds
from dxcli.training import state as saved_state
from dxcli.training.rollout import Rollout, completion_logprobs, rollout
from dxcli.training.sampler import ResumableShardSampler


@dataclass
class PrpoJob:
    run_dir: str
    config: str  # the run's resolved config.yaml
    records: str  # prompts: records JSONL (labels optional)
    images: str
    model: str  # the SFT checkpoint to start from
    resume: bool = False


@dataclass
class PrpoState:
    job: PrpoJob
    cfg: cfgmod.DxConfig
    dist: Dist
    bundle: Any
    engine: Any
    scheduler: Any
    reference: Any  # frozen copy of the start for the KL term; None when beta == 0 or with LoRA
    clip: Any  # ClipScorer for VCR; None when off
    lexicon: Any
    records: list
    sampler: ResumableShardSampler
    total_steps: int
    chunks: int  # the update runs in this many micro-batches of sequences
    step: int = 0
    epoch: int = 0
    position: int = 0  # images of this epoch's shard already used


def setup(job: PrpoJob) -> PrpoState:
    cfg = cfgmod.load(Path(job.config))
    p, hw = cfg.prpo, cfg.hardware
    dist = init_distributed()
    env.seed_everything(cfg.train.seed + dist.rank)  # ranks must sample different rollouts
    env.set_threads(hw.threads)
    # the policy: only the LLM learns
    attn = cfg.model.attn_implementation
    bundle = load_checkpoint(job.model, attn_implementation=attn)
    lora = cfg.model.lora.rank_for("prpo") > 0
    if lora:
        bundle.model = apply_lora(bundle.model, cfg.model.lora)
    bundle.model.freeze(vision=True, llm=False, projector=True, head=True)  # True = frozen
    if cfg.train.grad_checkpointing:
        bundle.model.gradient_checkpointing_enable()
    reference = None
    if p.beta > 0 and not lora:  # with LoRA the reference is the policy, adapters off: no copy
        reference = load_checkpoint(job.model, dtype=env.torch_dtype(hw.precision),
                                    attn_implementation=attn).model.to(dist.device).eval()
        reference.requires_grad_(False)
    clip = ClipScorer.load(p.clip, dist.device) if (p.algo == "prpo" and p.clip) else None
    # the prompts: every rank its own shard of images
    records = load_records(Path(job.records))
    sampler = ResumableShardSampler(len(records), dist.rank, dist.world, cfg.train.seed)
    per_epoch = max(1, len(sampler.shard(0)) // p.images_per_step)
    epochs = p.epochs if p.epochs is not None else cfg.train.epochs
    total_steps = max(1, math.ceil(epochs * per_epoch))
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    # the engine: one optimizer step per rollout, accumulated over `chunks` micro-batches
    sequences = p.images_per_step * p.group_size
    chunks = max(1, math.ceil(sequences / hw.micro_batch))
    ds_config = ds.deepspeed_config(cfg, lr=p.lr, world=dist.world)
    per_chunk = math.ceil(sequences / chunks)
    ds_config.update(train_micro_batch_size_per_gpu=per_chunk, gradient_accumulation_steps=chunks,
                     train_batch_size=per_chunk * chunks * dist.world)
    engine, scheduler = ds.initialize(bundle.model, ds_config, total_steps, cfg.train.warmup_ratio)
    bundle.model = engine.module
    if dist.main:
        tuning = f"LoRA r={cfg.model.lora.r}" + (" (reference: adapters off)" if p.beta > 0 else "") if lora else "full"
        print(f"[{p.algo}] labels={p.labels} G={p.group_size} images/step/rank={p.images_per_step} "
              f"VCR={'on' if clip else 'off'} beta={p.beta} {tuning}; {len(records)} prompts; {total_steps} steps",
              flush=True)
    return PrpoState(job, cfg, dist, bundle, engine, scheduler, reference, clip,
                     load_lexicon(Path(p.lexicon) if p.lexicon else None), records, sampler, total_steps, chunks)


def next_batch(state: PrpoState) -> list:
    """The next `images_per_step` records of this rank's shard, moving to a new epoch when it runs out."""
    n = state.cfg.prpo.images_per_step
    order = state.sampler.shard(state.epoch)
    if state.position + n > len(order):
        state.epoch, state.position = state.epoch + 1, 0
        order = state.sampler.shard(state.epoch)
    batch = [state.records[i] for i in order[state.position:state.position + n]]
    state.position += n
    return batch


def train_step(state: PrpoState, batch: list) -> dict[str, Any]:
    """Rollout on `batch`, then one optimizer step on it; returns the step's metrics (this rank)."""
    p, engine = state.cfg.prpo, state.engine
    started = time.time()
    # rollout: G samples per image from the current weights, with rewards and token advantages
    images = [load_rgb(Path(state.job.images) / r.image) for r in batch]
    labels = [("fake" if r.binary_label else "real") if r.binary_label is not None else None for r in batch]
    with ds.weights_for_generation(engine):  # ZeRO-3: gathered once for the whole rollout
        roll = rollout(state.bundle, images, [r.question for r in batch], labels, cfg=p, clip=state.clip,
                       lexicon=state.lexicon, seed=state.cfg.train.seed * 100_003 + state.step * state.dist.world
                       + state.dist.rank)
    if p.save_rollouts:
        save_rollouts(state, batch, roll)
    # update: the clipped surrogate over every sequence, in micro-batches
    engine.train()
    sums = update(state, roll)
    state.step += 1
    order_len = max(len(state.sampler.shard(state.epoch)), 1)
    return {"step": state.step, "epoch": state.epoch + state.position / order_len, **roll.stats, **sums,
            "lr": state.scheduler.get_last_lr()[0], "seconds": time.time() - started}


def save_rollouts(state: PrpoState, batch: list, roll: Rollout) -> None:
    """Append this step's responses, one line per image, to RUN/rollouts-rank{r}.jsonl (each rank its
    own file: no locking across processes). `step` is the step these rollouts train, as in metrics."""
    G = state.cfg.prpo.group_size
    path = Path(state.job.run_dir) / f"rollouts-rank{state.dist.rank}.jsonl"
    with path.open("a", encoding="utf-8") as fh:
        for i, record in enumerate(batch):
            fh.write(dumps_line({"step": state.step + 1, "rank": state.dist.rank, "image": record.image,
                                 "texts": roll.texts[i * G:(i + 1) * G]}))


def reference_logprobs(state: PrpoState, roll: Rollout, rows: slice) -> Any:
    """pi_ref's log-probs for the KL term (METHOD.md §13); None when beta == 0. The reference is the
    frozen copy of the start or, with LoRA, the policy with its adapters disabled: its own weights
    never train, so it is the start exactly."""
    if state.cfg.prpo.beta <= 0:
        return None
    with torch.no_grad():
        if state.reference is not None:
            return completion_logprobs(state.reference, roll, rows, state.engine.device)[0]
        with state.engine.module.disable_adapter():
            return completion_logprobs(state.engine, roll, rows, state.engine.device)[0]


def update(state: PrpoState, roll: Rollout) -> dict[str, float]:
    """One optimizer step over the rollout's sequences, accumulated over `state.chunks` micro-batches."""
    p, engine = state.cfg.prpo, state.engine
    sequences = roll.completion_ids.shape[0]
    per_chunk = math.ceil(sequences / state.chunks)
    total_tokens = roll.completion_mask.sum().clamp(min=1)
    sums = {"kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "loss": 0.0}
    for c in range(state.chunks):
        rows = slice(c * per_chunk, (c + 1) * per_chunk)
        ref_logp = reference_logprobs(state, roll, rows)  # first: no policy graph is alive during it
        logp, entropy = completion_logprobs(engine, roll, rows, engine.device)
        mask = roll.completion_mask[rows].to(engine.device).float()
        loss, info = policy_loss(logp, logp.detach(), roll.advantages[rows].to(engine.device), mask,
                                 eps_low=p.eps_low, eps_high=p.eps_high, beta=p.beta, ref_logp=ref_logp,
                                 agg=p.loss_agg)
        # each chunk's mean is reweighted so the step optimises the mean over the whole batch;
        # DeepSpeed divides by the accumulation steps, which `chunks` undoes.
        weight = (mask.sum() / total_tokens).item() if p.loss_agg == "token_mean" else mask.shape[0] / sequences
        engine.backward(loss * weight * state.chunks)
        engine.step()
        share = mask.sum().item() / total_tokens.item()
        sums["loss"] += loss.item() * weight
        sums["kl"] += float(info.get("kl", 0.0)) * share
        sums["clip_fraction"] += float(info.get("clip_fraction", 0.0)) * share
        sums["entropy"] += ((entropy * mask).sum() / total_tokens.to(engine.device)).item()
    return sums


def checkpoint(state: PrpoState) -> None:
    saved_state.save_training_state(state.engine, Path(state.job.run_dir) / "checkpoints", state.step,
                                    {"epoch": state.epoch, "position": state.position},
                                    state.cfg.train.keep_checkpoints, state.dist)


def resume(state: PrpoState) -> None:
    client = saved_state.load_training_state(state.engine, Path(state.job.run_dir) / "checkpoints", state.dist)
    if client:
        state.step, state.epoch, state.position = client["step"], client["epoch"], client["position"]


def save(state: PrpoState) -> Path:
    checkpoint(state)
    out_dir = Path(state.job.run_dir) / "model"
    saved_state.save_final_model(state.engine, state.bundle, out_dir, state.cfg.hardware.zero_stage, state.dist)
    if state.dist.main:
        print(f"[{state.cfg.prpo.algo}] saved {out_dir}", flush=True)
    return out_dir


def run(job: PrpoJob) -> Path:
    state = setup(job)
    if job.resume:
        resume(state)
    p, train = state.cfg.prpo, state.cfg.train
    log = MetricsLog(Path(job.run_dir) / "metrics.jsonl", state.dist.main)
    progress = ProgressView(state.total_steps, p.algo, state.dist.main, start=state.step)
    stop_after = env.stop_after_step()
    while state.step < state.total_steps:
        row = mean_over_ranks(train_step(state, next_batch(state)), state.dist)
        if state.step % train.log_every == 0 or state.step == state.total_steps:
            log.write(row)
        progress.update(state.step, {k: row[k] for k in ("reward", "invalid_rate", "response_tokens", "kl") if k in row})
        if (train.save_every and state.step % train.save_every == 0) or state.step == stop_after:
            checkpoint(state)
        if state.step == stop_after:
            progress.close()
            raise SystemExit(f"[{p.algo}] stopped after step {state.step} ({env.STOP_AFTER_ENV})")
    progress.close()
    return save(state)
