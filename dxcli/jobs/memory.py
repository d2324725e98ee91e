"""Per-GPU memory plan of a training stage, offline: parameter counts come from the model built on
the meta device from shipped shapes (model.shapes), the rest is arithmetic over the config.

Memory over a step comes in phases that do not overlap: the rollout (PRPO's generation: KV cache,
ZeRO-3 gathered weights), the update (forward/backward: activations, logits) and, under ZeRO-3, the
optimizer step (fp32 gradients of one sub-group). What lives throughout (weights, gradients,
optimizer states, reference model, CLIP, CUDA/NCCL) is counted once; the peak is that plus the
largest phase. Model states follow DeepSpeed's own estimators (stage_1_and_2 / stage3
`estimate_zero{2,3}_model_states_mem_needs`); where dx knows better it says so in a comment.
Figures are GiB (2**30 bytes), as is hardware.gpu_memory_gb (the card's total as CUDA reports it).
Each plan also sizes the stage's checkpoint and its write time (jobs.memory_checkpoint).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from dxcli.config import DxConfig, zero_stage_for
from dxcli.jobs.memory_checkpoint import CheckpointPlan, plan_checkpoint
from dxcli.jobs.memory_fix import as_flags, candidate_changes
from dxcli.jobs.memory_shapes import ModelShapes, clip_parameters, model_shapes
from dxcli.training.engine import ZERO3_MAX_LIVE_PARAMETERS
from dxcli.base.errors import DxError, UsageError

GIB = 2**30
STAGES = ("align", "instruct", "prpo")
PHASES = ("rollout", "update", "step")  # besides "always"

# Text tokens of the PRPO prompt besides the image tokens: dx's template (Vicuna system prompt,
# USER/ASSISTANT, the default question) is ~90 Llama tokens; 128 leaves room for longer questions.
PROMPT_TEXT_TOKENS = 128
# Activations kept by one Llama decoder layer for backward, in bytes per token per hidden unit at
# 16-bit precision, counted from the tensors HF's LlamaDecoderLayer saves with SDPA attention:
# 2 RMSNorms x 6 (fp32 input 4 + 16-bit output 2), q/k/v input 2, q/k/v after RoPE 6, attention
# output 2 + its contiguous copy for o_proj 2, MLP input 2, gate/up/silu/product 4 x 2 x 2.6875
# (intermediate 11008 / hidden 4096) = 21.5 -> 47.5, rounded to 48. Same method as Korthikanti et
# al. 2022 (arXiv:2205.05198, table 2: 34 + 5as/h for GPT blocks); SDPA keeps no s x s scores and
# Llama has no dropout masks, its SwiGLU MLP stores more than GPT's.
ACT_BYTES_PER_LAYER = 48
# With gradient checkpointing HF keeps each decoder layer's 16-bit input (2 bytes) and recomputes
# one layer at a time in backward (its 48 bytes live once).
CKPT_BYTES_PER_LAYER = 2
# Logits, bytes per (token x vocab) element at the peak of the loss. SFT (HF ForCausalLMLoss): the
# 16-bit logits 2 (kept by the output until backward ends) + in the loss's backward its saved fp32
# log-softmax 4, the gradient reaching it 4 and the one it passes on 4 = 14 (LLaVA's transformers
# < 4.46 reached 14 in the forward: fp32 upcast + a shifted fp32 copy + log-softmax). PRPO
# (rl.prpo.completion_logprobs): fp32 upcast 4 + log-softmax 4 + exp 4 + product 4 for the entropy
# = 16. The reference pass (a copy, or the policy with LoRA adapters off) runs first and is freed
# before the policy pass: no overlap.
SFT_LOGIT_BYTES = 14
PRPO_LOGIT_BYTES = 16
# Fixed per-GPU cost: CUDA context (~0.5 GiB), NCCL communicators and buffers (~1 GiB), cuBLAS
# workspaces and allocator fragmentation. A rule of thumb, not a measurement: 2.5 GiB.
CUDA_OVERHEAD_GIB = 2.5
# DeepSpeed defaults dx does not change (training.engine.deepspeed_config): reduce_bucket_size 5e8
# elements, ZeRO-3 sub_group_size 1e9 elements.
REDUCE_BUCKET = 500_000_000
SUB_GROUP = 1_000_000_000
# check_plan_fits suggests changes that leave this share free when it can: the plan is an estimate.
SUGGEST_MARGIN = 0.10


@dataclass
class PlanRow:
    item: str
    gib: float
    note: str
    phase: str = "always"  # always | rollout | update | step
    model_state: bool = False  # parameters, gradients, optimizer states (what DeepSpeed estimates)
    cpu_gib: float = 0.0  # what offload puts in CPU memory instead, per process


@dataclass
class MemoryPlan:
    stage: str
    rows: list[PlanRow]
    capacity: float  # GiB per GPU; 0 = unknown
    world: int
    shapes: ModelShapes
    checkpoint: CheckpointPlan | None = None
    phase_totals: dict[str, float] = field(default_factory=dict)
    total: float = 0.0

    def __post_init__(self) -> None:
        always = sum(r.gib for r in self.rows if r.phase == "always")
        self.phase_totals = {p: sum(r.gib for r in self.rows if r.phase == p) for p in PHASES}
        self.total = always + max(self.phase_totals.values())

    @property
    def fits(self) -> bool:
        return self.capacity <= 0 or self.total <= self.capacity

    @property
    def headroom(self) -> float | None:
        """Share of the capacity left free at the peak; None when the capacity is unknown."""
        return (self.capacity - self.total) / self.capacity if self.capacity > 0 else None

    @property
    def model_states_gib(self) -> float:
        return sum(r.gib for r in self.rows if r.model_state)

    @property
    def cpu_gib(self) -> float:
        return sum(r.cpu_gib for r in self.rows)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Setup:
    """The config facts every row needs, read once."""

    stage: str
    world: int
    zero: int
    nbytes: int  # bytes of a 16-bit (or fp32) parameter / activation element
    mixed: bool  # bf16/fp16 weights with fp32 master weights in the optimizer
    offload_optimizer: bool
    offload_params: bool
    lora_r: int
    reference: bool  # PRPO's KL term needs reference log-probs


def _setup(config: DxConfig, stage: str, lora_r: int | None) -> _Setup:
    if stage not in STAGES:
        raise UsageError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    hw = config.hardware
    zero = zero_stage_for(config, stage)  # align may run its own ZeRO stage (align.zero_stage)
    if lora_r is None:  # the run's own setting for this stage (0: full fine-tuning; align: always 0)
        lora_r = config.model.lora.rank_for(stage)
    if lora_r < 0:
        raise UsageError(f"LoRA rank must be >= 0, got {lora_r}")
    if stage == "align":  # align trains no LLM weight, so training.sft puts no adapters on it
        lora_r = 0
    return _Setup(stage=stage, world=max(1, hw.nproc_per_node * hw.nnodes), zero=zero,
                  nbytes=4 if hw.precision == "fp32" else 2, mixed=hw.precision != "fp32",
                  offload_optimizer=hw.offload_optimizer and zero >= 2,  # as training.engine applies them
                  offload_params=hw.offload_params and zero == 3, lora_r=lora_r,
                  reference=stage == "prpo" and config.prpo.beta > 0)


def plan_memory(config: DxConfig, stage: str, *, lora_r: int | None = None,
                shapes: ModelShapes | None = None) -> MemoryPlan:
    """Per-GPU memory of `stage` under `config`. `lora_r` > 0 plans LoRA on the LLM (trainable =
    adapters; PRPO's reference = the same weights with adapters off, no second copy)."""
    s = _setup(config, stage, lora_r)
    shapes = shapes or model_shapes(config.model)
    trainable = _trainable(s, config, shapes)
    rows = _param_rows(s, shapes)
    rows += _gradient_rows(s, sum(trainable.values()))
    rows += _buffer_rows(s, config, shapes, sum(trainable.values()))
    if stage == "prpo":
        rows += _rollout_rows(s, config, shapes)
    rows += _update_rows(s, config, shapes)
    checkpoint = plan_checkpoint(config, zero=s.zero, nbytes=s.nbytes, trainable=sum(trainable.values()))
    return MemoryPlan(stage, rows, config.hardware.gpu_memory_gb, s.world, shapes, checkpoint=checkpoint)


def _trainable(s: _Setup, config: DxConfig, shapes: ModelShapes) -> dict[str, int]:
    """Trainable parameters per part, as dxcli.training.sft.frozen_parts and rl.prpo freeze them."""
    llm = s.lora_r * shapes.lora_per_rank if s.lora_r else shapes.llm
    if s.stage == "align":
        return {"projector": shapes.projector, "head": shapes.head}
    if s.stage == "instruct":
        vision = shapes.vision if config.instruct.unfreeze_vision else 0
        return {"vision": vision, "projector": shapes.projector, "llm": llm, "head": shapes.head}
    return {"llm": llm}


def _gib(n: float) -> float:
    return n / GIB


def _row(item: str, nbytes: float, note: str, *, on_cpu: bool = False, **kw: Any) -> PlanRow:
    """A row whose `nbytes` sit on the GPU, or in CPU memory (then 0 GiB on the GPU) when offloaded."""
    if on_cpu:
        return PlanRow(item, 0.0, f"{note}; on CPU: {_gib(nbytes):.1f} GiB", cpu_gib=_gib(nbytes), **kw)
    return PlanRow(item, _gib(nbytes), note, **kw)


def _param_rows(s: _Setup, shapes: ModelShapes) -> list[PlanRow]:
    """DeepSpeed casts the whole module to bf16/fp16, frozen parts too; ZeRO-3 partitions all of them."""
    split = s.world if s.zero == 3 else 1
    kind = {2: "16-bit", 4: "fp32"}[s.nbytes]
    where = f"{kind} / {split} GPUs" if split > 1 else kind
    parts = [("vision tower", shapes.vision), ("projector", shapes.projector), ("LLM", shapes.llm),
             ("binary head", shapes.head)]
    rows = [_row(f"parameters: {name}", n * s.nbytes / split, f"{n / 1e6:,.1f}M, {where}",
                 on_cpu=s.offload_params, model_state=True) for name, n in parts]
    if s.lora_r:
        n = s.lora_r * shapes.lora_per_rank
        rows.append(_row(f"parameters: LoRA r={s.lora_r}", n * s.nbytes / split,
                         f"{n / 1e6:,.1f}M on {','.join(t.removesuffix('_proj') for t in shapes.lora_targets)}", on_cpu=s.offload_params, model_state=True))
    return rows


def _gradient_rows(s: _Setup, trainable: int) -> list[PlanRow]:
    """Gradients and AdamW states of the trainable parameters (DeepSpeed's estimator conventions).

    Mixed precision: 16-bit gradients (2 B), fp32 gradients for the step (4 B), fp32 master weights +
    Adam m + v (12 B). ZeRO-1 partitions the fp32 side, ZeRO-2 also the 16-bit gradients
    (stage_1_and_2's estimator: 2 + 18/GPUs bytes per parameter). ZeRO-3 keeps a 16-bit gradient
    partition (stage3.py grad_partitions_flat_buffer; the stage-3 estimator leaves it out) and
    makes fp32 gradients one sub-group at a time during the step. Offload puts all of it in CPU memory.
    """
    g, t, off = s.world, trainable, s.offload_optimizer
    low_split = g if s.zero >= 2 else 1
    high_split = g if s.zero >= 1 else 1
    rows = []
    if s.mixed:
        rows.append(_row("gradients: 16-bit", 2 * t / low_split, _split_note(t, low_split), on_cpu=off,
                         model_state=True))
        if s.zero == 3:
            chunk = min(SUB_GROUP, math.ceil(t / g))
            rows.append(_row("gradients: fp32 for the step", 4 * chunk, f"one ZeRO-3 sub-group, {chunk / 1e6:,.0f}M", on_cpu=off, phase="step", model_state=True))
        else:
            rows.append(_row("gradients: fp32 for the step", 4 * t / high_split, _split_note(t, high_split),
                             on_cpu=off, model_state=True))
        optimizer, what = 12 * t, "fp32 master, m, v: 12 B"
    else:
        rows.append(_row("gradients: fp32", 4 * t / low_split, _split_note(t, low_split), on_cpu=off,
                         model_state=True))
        optimizer, what = 8 * t, "m, v: 8 B"
    rows.append(_row("optimizer states", optimizer / high_split, f"{what} x {_split_note(t, high_split)}",
                     on_cpu=off, model_state=True))
    return rows


def _split_note(n: int, split: int) -> str:
    return f"{n / 1e6:,.1f}M trainable" + (f" / {split}" if split > 1 else "")


def _buffer_rows(s: _Setup, config: DxConfig, shapes: ModelShapes, trainable: int) -> list[PlanRow]:
    """What lives beside the model states: DeepSpeed buffers, reference model, CLIP, CUDA/NCCL."""
    rows = []
    if s.zero == 3:
        # DeepSpeed keeps up to stage3_max_live_parameters gathered (prefetches included) before it
        # releases any: its estimator's 4 B x largest layer is a floor, this the bound
        live = min(ZERO3_MAX_LIVE_PARAMETERS, shapes.total + s.lora_r * shapes.lora_per_rank)
        rows.append(_row("ZeRO-3 gathered parameters", live * s.nbytes,
                         f"stage3_max_live_parameters {ZERO3_MAX_LIVE_PARAMETERS / 1e9:g}e9 x {s.nbytes} B",
                         phase="update"))
    if s.zero >= 1 and trainable:
        # ZeRO-1 stages its reduction in fp32, ZeRO-2/3 in the training dtype (stage_1_and_2.py)
        width = 4 if s.zero == 1 else s.nbytes
        rows.append(_row("ZeRO reduce bucket", REDUCE_BUCKET * width, "DeepSpeed's reduce_bucket_size 5e8"))
    if s.reference:
        if s.lora_r:
            rows.append(_row("reference model", 0, "LoRA: the policy, adapters off"))
        else:
            rows.append(_row("reference model", shapes.total * s.nbytes,
                             f"beta {config.prpo.beta:g}: full {config.hardware.precision} copy"))
    if s.stage == "prpo" and config.prpo.algo == "prpo" and config.prpo.clip:
        n, what = clip_parameters(config.prpo.clip)  # fp32, as rl.clip loads it, for the whole run
        rows.append(_row("CLIP (VCR)", n * 4, f"{n / 1e6:,.1f}M, fp32: {what}"))
    rows.append(_row("CUDA/NCCL overhead", CUDA_OVERHEAD_GIB * GIB,
                     "rule of thumb: context, NCCL, fragmentation"))
    return rows


def _prompt_tokens(shapes: ModelShapes) -> int:
    return shapes.image_tokens + PROMPT_TEXT_TOKENS


def _rollout_rows(s: _Setup, config: DxConfig, shapes: ModelShapes) -> list[PlanRow]:
    p = config.prpo
    sequences = p.images_per_step * p.group_size
    tokens = _prompt_tokens(shapes) + p.max_new_tokens
    per_token = shapes.layers * 2 * shapes.kv_heads * shapes.head_dim * s.nbytes
    rows = [_row("KV cache (rollout)", sequences * tokens * per_token,
                 f"{p.images_per_step}x{p.group_size} seqs x {tokens} tok x {shapes.layers} x 2 x "
                 f"{shapes.kv_heads} x {shapes.head_dim}", phase="rollout")]
    if s.zero == 3:
        rows.append(_row("ZeRO-3 gather for generation", shapes.total * s.nbytes,
                         "full model (upper bound)", phase="rollout"))
    return rows


def _update_rows(s: _Setup, config: DxConfig, shapes: ModelShapes) -> list[PlanRow]:
    """Activations and logits of one forward/backward micro-batch."""
    if s.stage == "prpo":
        p = config.prpo
        sequences = p.images_per_step * p.group_size
        seqs = math.ceil(sequences / math.ceil(sequences / config.hardware.micro_batch))  # as rl.prpo chunks
        length, scored = _prompt_tokens(shapes) + p.max_new_tokens, p.max_new_tokens
        logit_bytes = PRPO_LOGIT_BYTES
    else:
        seqs, length = config.hardware.micro_batch, config.train.max_length
        scored, logit_bytes = length, SFT_LOGIT_BYTES
    tokens = seqs * length
    scale = s.nbytes / 2  # the per-layer factors are for 16-bit activations
    if config.train.grad_checkpointing:
        per_token = (CKPT_BYTES_PER_LAYER * shapes.layers + ACT_BYTES_PER_LAYER) * scale
        how = f"({CKPT_BYTES_PER_LAYER} B x {shapes.layers} + {ACT_BYTES_PER_LAYER} B), checkpointed"
    else:
        per_token = ACT_BYTES_PER_LAYER * shapes.layers * scale
        how = f"{ACT_BYTES_PER_LAYER} B x {shapes.layers}, no checkpointing"
    return [
        _row("activations", tokens * shapes.hidden * per_token,
             f"{seqs} x {length} tok x {shapes.hidden} x {how}", phase="update"),
        _row("logits", seqs * scored * shapes.vocab * logit_bytes,
             f"{seqs} x {scored} tok x {shapes.vocab} x {logit_bytes} B",
             phase="update"),
    ]


# ---------------------------------------------------------------- the check before training


def check_plan_fits(config: DxConfig, stage: str, *, lora_r: int | None = None) -> None:
    """Raise DxError when `stage` will not fit hardware.gpu_memory_gb, with the biggest items and a
    `--set` that makes it fit. Skipped when the capacity is unknown (0) or hardware.skip_memory_check."""
    hw = config.hardware
    if hw.skip_memory_check or hw.gpu_memory_gb <= 0:
        return
    plan = plan_memory(config, stage, lora_r=lora_r)
    if plan.fits:
        return
    biggest = sorted(plan.rows, key=lambda r: r.gib, reverse=True)[:4]
    items = ", ".join(f"{r.item} {r.gib:.1f}" for r in biggest)
    fix = suggest_fix(config, stage, lora_r=lora_r)
    advice = f"try {fix}" if fix else "no --set dx tried fits: use more GPUs (hardware.nproc_per_node)"
    raise DxError(f"{stage} needs ~{plan.total:.1f} GiB per GPU, more than hardware.gpu_memory_gb="
                  f"{hw.gpu_memory_gb:g} (largest: {items} GiB); {advice}, or --set "
                  "hardware.skip_memory_check=true to start anyway (dx profiles show PROFILE --memory "
                  f"--stage {stage} shows the plan)")


def suggest_fix(config: DxConfig, stage: str, *, lora_r: int | None = None) -> str | None:
    """The first `--set ...` that makes `stage` fit: one change, then the changes combined in order
    (cheapest for speed and training semantics first); leaving 10% free if any can, as the
    profiles do, since the plan is an estimate. None when nothing tried fits."""
    shapes = model_shapes(config.model)
    changes = candidate_changes(config, stage)
    for margin in (SUGGEST_MARGIN, 0.0):
        for change in changes:
            if _fits_with(config, stage, change, lora_r, shapes, margin):
                return as_flags(change)
        combined: dict[str, Any] = {}
        for change in changes:
            combined.update(change)
            if _fits_with(config, stage, combined, lora_r, shapes, margin):
                return as_flags(_prune(config, stage, combined, lora_r, shapes, margin))
    return None


def _prune(config: DxConfig, stage: str, change: dict[str, Any], lora_r: int | None, shapes: ModelShapes,
           margin: float) -> dict[str, Any]:
    """Drop the parts of a combined change that the fit does not need (they only cost speed)."""
    change = dict(change)
    for key in list(change):
        if key == "hardware.grad_accum":  # goes with micro_batch
            continue
        rest = {k: v for k, v in change.items() if k != key
                and not (key == "hardware.micro_batch" and k == "hardware.grad_accum")}
        if _fits_with(config, stage, rest, lora_r, shapes, margin):
            change = rest
    return change


def _fits_with(config: DxConfig, stage: str, change: dict[str, Any], lora_r: int | None,
               shapes: ModelShapes, margin: float) -> bool:
    trial = copy.deepcopy(config)
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(trial, section), name, value)
    if trial.hardware.offload_params and zero_stage_for(trial, stage) != 3:
        return False
    plan = plan_memory(trial, stage, lora_r=lora_r, shapes=shapes)
    return plan.total <= plan.capacity * (1 - margin)
