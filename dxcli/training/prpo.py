"""PRPO (and the GRPO baseline): one RL recipe on DeepSpeed (METHOD.md §7-§13).

Each step: a batch of images -> G samples per image from the CURRENT weights (`rollout`: one
batched generate; image features computed once and reused by all G samples and by the log-prob
pass) -> advantages (`dxcli.rl.advantages`) -> log-probs WITH the image -> clipped surrogate
(+ k3 KL when beta > 0) -> `prpo.updates_per_rollout` optimizer steps. With one update the old
log-probs equal the current ones, detached: no extra forward pass; with several they are recorded
once, before the first. The vision tower, projector and head stay frozen. Dropout (LoRA's too) is
off in every RL pass, so all of them score the same policy. Each step's metrics are reduced over
ranks by a key set fixed by the config (`step_metric_keys`); accuracies against the labels, which
only some ranks may have, are pooled as (hits, count).

The run ends with RUN/summary.json (steps, steps with a non-zero advantage, ...), from which the
parent tells the user when a run had no learning signal at all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dxcli import config as cfgmod
from dxcli.base.images import load_rgb
from dxcli.base.jsonio import dumps_line
from dxcli.data.records import load_records
from dxcli.model.checkpoint import load_checkpoint
from dxcli.model import checkpointing
from dxcli.model.kernels import apply_kernels
from dxcli.model.lora import apply_lora
from dxcli.rl.clip import load_clip
from dxcli.rl.guard import ProbeMix
from dxcli.rl.objective import policy_loss
from dxcli.rl.rewards import load_lexicon
from dxcli.runtime import env
from dxcli.runtime.dist import Dist, MetricKeys, init_distributed, reduce_metrics
from dxcli.runtime.interrupt import StopRequest
from dxcli.runtime.metrics import MetricsLog
from dxcli.runtime.progress import ProgressView
from dxcli.training import engine as ds
from dxcli.training import state as saved_state
from dxcli.training.guard import Guard, HealthyCopy, guard_due, probe_mix, probe_set
from dxcli.training.rollout import Rollout, completion_logprobs, rollout, rollout_stat_keys
from dxcli.training.sampler import ResumableShardSampler

UPDATE_KEYS = ("loss", "kl", "clip_fraction", "entropy")  # what `update` returns: means over its steps


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
    # steps (over all ranks) with some non-zero advantage, and steps where no answer was valid
    tally: dict[str, int] = field(default_factory=lambda: {"steps_with_signal": 0, "steps_all_invalid": 0})
    guard: Guard | None = None  # the collapse guard (prpo.guard), opened when the loop starts
    guard_start: dict[str, int] | None = None  # the start's probe answers, kept across --resume


def setup(job: PrpoJob) -> PrpoState:
    cfg = cfgmod.load(Path(job.config))
    p, hw = cfg.prpo, cfg.hardware
    dist = init_distributed()
    env.seed_everything(cfg.train.seed + dist.rank)  # ranks must sample different rollouts
    env.set_threads(hw.threads)
    # the policy: only the LLM learns
    attn = cfg.model.attn_implementation
    bundle = load_checkpoint(job.model, attn_implementation=attn)
    apply_kernels(bundle.model, hw.kernels)  # before LoRA and DeepSpeed wrap the modules it patches
    lora = cfg.model.lora.rank_for("prpo") > 0
    if lora:
        bundle.model = apply_lora(bundle.model, cfg.model.lora)
    # every RL pass (rollout, old, reference, policy) must score the same function: see disable_dropout
    disable_dropout(bundle.model)
    bundle.model.freeze(vision=True, llm=False, projector=True, head=True)  # True = frozen
    if cfg.train.grad_checkpointing:
        checkpointing.enable(bundle.model)  # non-reentrant, as the DeepSpeed floor was established with
    reference = None
    if p.beta > 0 and not lora:  # with LoRA the reference is the policy, adapters off: no copy
        reference = load_checkpoint(job.model, dtype=env.torch_dtype(hw.precision),
                                    attn_implementation=attn).model.to(dist.device).eval()
        apply_kernels(reference, hw.kernels)  # the KL compares like with like: both fused or both plain
        reference.requires_grad_(False)
    clip = load_clip(p.clip, dist.device) if (p.algo == "prpo" and p.clip) else None
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
    # the schedule counts optimizer steps: several per rollout when updates_per_rollout > 1
    engine, scheduler = ds.initialize(bundle.model, ds_config, total_steps * p.updates_per_rollout,
                                      cfg.train.warmup_ratio)
    bundle.model = engine.module
    if dist.main:
        tuning = f"LoRA r={cfg.model.lora.r}" + (" (reference: adapters off)" if p.beta > 0 else "") if lora else "full"
        print(f"[{p.algo}] labels={p.labels} G={p.group_size} images/step/rank={p.images_per_step} "
              f"VCR={clip.name if clip else 'off'} beta={p.beta} {tuning} updates/rollout={p.updates_per_rollout}; "
              f"{len(records)} prompts; {total_steps} steps", flush=True)
    return PrpoState(job, cfg, dist, bundle, engine, scheduler, reference, clip,
                     load_lexicon(Path(p.lexicon) if p.lexicon else None), records, sampler, total_steps, chunks)


def disable_dropout(model: torch.nn.Module) -> int:
    """Dropout off for good in the RL policy (as TRL's `disable_dropout`); returns how many layers
    had it on. The modules stay in train mode (gradient checkpointing only acts in train mode), so
    their probabilities are set to 0 instead: the rollout (eval mode), the old and reference
    log-probs and the policy's then score the same function, and the first update's ratio is
    exactly 1. Covers LoRA's dropout (model.lora.dropout) and attention dropout held as a number
    (transformers' `attention_dropout`). Only this recipe calls it: instruct keeps its dropout."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, changed = 0.0, changed + 1
    return changed


def step_metric_keys(state: PrpoState) -> MetricKeys:
    """What each step logs, the same on every rank (METHOD.md §7): the rollout's statistics, the
    updates' means, and the loop's own figures."""
    means, ratios = rollout_stat_keys(state.cfg.prpo, vcr=state.clip is not None)
    return MetricKeys(means=("epoch", *means, *UPDATE_KEYS, "lr", "seconds"), ratios=ratios, same=("step",))


def record_labels(batch: list) -> list[str | None]:
    """The ground-truth verdict of each record ("real" / "fake"), None when unlabelled."""
    return [record.label for record in batch]


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
    """Rollout on `batch`, then the policy update(s) on it; returns the step's metrics (this rank)."""
    p, engine = state.cfg.prpo, state.engine
    started = time.time()
    # rollout: G samples per image from the current weights, with rewards and token advantages
    images = [load_rgb(Path(state.job.images) / r.image) for r in batch]
    labels = record_labels(batch)
    with ds.weights_for_generation(engine):  # ZeRO-3: gathered once for the whole rollout
        roll = rollout(state.bundle, images, [r.question for r in batch], labels, cfg=p, clip=state.clip,
                       lexicon=state.lexicon, seed=state.cfg.train.seed * 100_003 + state.step * state.dist.world
                       + state.dist.rank, compiled=state.cfg.hardware.compiled_decode)
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
    kernels = state.cfg.hardware.kernels
    with torch.no_grad():
        if state.reference is not None:
            return completion_logprobs(state.reference, roll, rows, state.engine.device, kernels)[0]
        with state.engine.module.disable_adapter():
            return completion_logprobs(state.engine, roll, rows, state.engine.device, kernels)[0]


def update(state: PrpoState, roll: Rollout) -> dict[str, float]:
    """`prpo.updates_per_rollout` optimizer steps on one rollout (METHOD.md §13); metrics are the
    mean over those steps (the first always has clip_fraction 0: its ratio is 1)."""
    fixed = fixed_logprobs(state, roll)
    steps = [policy_step(state, roll, fixed) for _ in range(state.cfg.prpo.updates_per_rollout)]
    return {key: sum(step[key] for step in steps) / len(steps) for key in steps[0]}


def chunk_rows(state: PrpoState, roll: Rollout) -> list[slice]:
    """The rollout's sequences in `state.chunks` micro-batches."""
    per_chunk = math.ceil(roll.completion_ids.shape[0] / state.chunks)
    return [slice(c * per_chunk, (c + 1) * per_chunk) for c in range(state.chunks)]


@torch.no_grad()
def fixed_logprobs(state: PrpoState, roll: Rollout) -> list[tuple[Any, Any]]:
    """(old, reference) log-probs per micro-batch, fixed for every update on this rollout.

    old: under the weights that sampled the rollout, recorded before the first update; None with
    one update per rollout, where they equal the current log-probs (detached) and cost no forward.
    reference: the frozen start, or the policy with its LoRA adapters off (beta > 0), else None.
    """
    engine, several = state.engine, state.cfg.prpo.updates_per_rollout > 1
    fixed = []
    for rows in chunk_rows(state, roll):
        old = completion_logprobs(engine, roll, rows, engine.device, state.cfg.hardware.kernels)[0] if several else None
        fixed.append((old, reference_logprobs(state, roll, rows)))
    return fixed


def policy_step(state: PrpoState, roll: Rollout, fixed: list[tuple[Any, Any]]) -> dict[str, float]:
    """One optimizer step over the rollout's sequences, accumulated over `state.chunks` micro-batches."""
    p, engine = state.cfg.prpo, state.engine
    sequences = roll.completion_ids.shape[0]
    total_tokens = roll.completion_mask.sum().clamp(min=1)
    sums = dict.fromkeys(UPDATE_KEYS, 0.0)
    for rows, (old_logp, ref_logp) in zip(chunk_rows(state, roll), fixed):
        logp, entropy = completion_logprobs(engine, roll, rows, engine.device, state.cfg.hardware.kernels)
        mask = roll.completion_mask[rows].to(engine.device).float()
        old_logp = logp.detach() if old_logp is None else old_logp
        loss, info = policy_loss(logp, old_logp, roll.advantages[rows].to(engine.device), mask,
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
                                    {"epoch": state.epoch, "position": state.position, "tally": state.tally,
                                     "guard_start": state.guard.start.to_json() if state.guard else None},
                                    state.cfg.train.keep_checkpoints, state.dist)


def resume(state: PrpoState, log: MetricsLog) -> None:
    client = saved_state.load_training_state(state.engine, Path(state.job.run_dir) / "checkpoints", state.dist)
    if client:
        state.step, state.epoch, state.position = client["step"], client["epoch"], client["position"]
        log.drop_after(state.step)
        if state.dist.main:
            print(f"[{state.cfg.prpo.algo}] resumed from {client['tag']} (step {state.step})", flush=True)
        # a checkpoint from before the tally existed: assume its steps had signal rather than warn wrongly
        state.tally.update(client.get("tally", {"steps_with_signal": state.step}))
        state.guard_start = client.get("guard_start")


def count_signal(state: PrpoState, row: dict[str, Any]) -> None:
    """Tally the step (its metrics already averaged over ranks): did any rollout have a non-zero
    advantage, and was every answer invalid? (A rank with signal is enough: gradients are averaged.)"""
    state.tally["steps_with_signal"] += int(row["zero_advantage_share"] < 1.0)
    state.tally["steps_all_invalid"] += int(row["invalid_rate"] >= 1.0)


def write_summary(state: PrpoState) -> None:
    """RUN/summary.json: what the parent needs to say whether the run could learn at all, and
    whether the collapse guard stopped it (`stopped_by_guard`: null, or what it saw)."""
    if state.dist.main:
        p = state.cfg.prpo
        summary = {"algo": p.algo, "steps": state.step, **state.tally, "max_new_tokens": p.max_new_tokens,
                   "stopped_by_guard": state.guard.tripped if state.guard else None}
        (Path(state.job.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


DRIFTED_DIR = "drifted"  # RUN/drifted/model: the weights the collapse guard refused, kept aside


def save(state: PrpoState) -> Path:
    """Checkpoint, summary and RUN/model. After the collapse guard tripped: the drifted weights go
    to RUN/drifted/model, RUN/model gets the last healthy copy, and no checkpoint is written (the
    optimizer's state has drifted too; --resume continues from the last regular checkpoint)."""
    run_dir, zero_stage = Path(state.job.run_dir), state.cfg.hardware.zero_stage
    if state.guard and state.guard.tripped:
        saved_state.save_final_model(state.engine, state.bundle, run_dir / DRIFTED_DIR / "model", zero_stage,
                                     state.dist)
        state.guard.copy.restore(state.engine.module)
        state.guard.tripped["drifted_model"] = str(run_dir / DRIFTED_DIR / "model")
    else:
        checkpoint(state)
    write_summary(state)
    return saved_state.finish(state.engine, state.bundle, run_dir, zero_stage, state.dist, state.cfg.prpo.algo)


def probe_now(state: PrpoState, probe: list) -> ProbeMix:
    """The current policy's greedy verdicts on `probe`, this rank's share of the guard's prompts (all ranks)."""
    cfg = state.cfg
    return probe_mix(state.engine, state.bundle, probe, Path(state.job.images),
                     max_new_tokens=cfg.prpo.max_new_tokens, batch_size=cfg.eval.batch_size, dist=state.dist)


def open_guard(state: PrpoState) -> Guard | None:
    """The collapse guard for this run (None with prpo.guard off): the start's probe answers
    (probed now, or kept from before a --resume) and a first healthy copy, the current weights."""
    p = state.cfg.prpo
    if not p.guard:
        return None
    probe = probe_set(state.records, p.guard_probe_size, state.cfg.train.seed, state.dist)
    start = ProbeMix(**state.guard_start) if state.guard_start else probe_now(state, probe)
    guard = Guard(probe, start, HealthyCopy(Path(state.job.run_dir) / "guard", state.dist),
                  healthy_step=state.step)
    guard.copy.take(state.engine.module)
    if state.dist.main:
        print(f"[{p.algo}] collapse guard: {start.total} probe prompts every {p.guard_every} steps; "
              f"start: {start.describe()}", flush=True)
    return guard


def guard_stops(state: PrpoState) -> bool:
    """After a step: probe when due; True when the policy collapsed (every rank decides alike)."""
    p = state.cfg.prpo
    if state.guard is None or not guard_due(state.step, state.total_steps, p.guard_every):
        return False
    return state.guard.check(probe_now(state, state.guard.probe), state.step, p, state.engine.module)


def run(job: PrpoJob) -> Path:
    return saved_state.run_recipe(job, setup, resume, train_loop, save)


def train_loop(state: PrpoState, log: MetricsLog) -> None:
    """Rollout + update steps up to `total_steps`: metrics every `log_every`, checkpoints when due."""
    p, train = state.cfg.prpo, state.cfg.train
    progress = ProgressView(state.total_steps, p.algo, state.dist.main, start=state.step)
    keys = step_metric_keys(state)
    state.guard = open_guard(state)
    with StopRequest(state.dist, train.save_every_minutes) as stop:
        while state.step < state.total_steps:
            row = reduce_metrics(train_step(state, next_batch(state)), keys, state.dist)
            count_signal(state, row)
            if state.step % train.log_every == 0 or state.step == state.total_steps:
                log.write(row)
            progress.update(state.step, {k: row[k] for k in ("reward", "invalid_rate", "response_tokens", "kl")
                                         if k in row})
            if guard_stops(state):  # before any checkpoint: a drifted policy is never saved as progress
                break
            saved_state.checkpoint_or_stop(step=state.step, save_every=train.save_every, run_dir=Path(state.job.run_dir),
                                           label=p.algo, dist=state.dist, save=lambda: checkpoint(state),
                                           progress=progress, stop=stop)
    progress.close()
