"""The one-key changes the memory planner's fit search tries (jobs.memory.suggest_fix), cheapest
for speed and training semantics first, and how it prints them as `--set` flags."""

from __future__ import annotations

from typing import Any

from dxcli.config import DxConfig, zero_stage_for


def candidate_changes(config: DxConfig, stage: str) -> list[dict[str, Any]]:
    """Single changes in the order the search tries them; the ZeRO stage is the stage's own (an
    align.zero_stage override is what must change for align)."""
    hw, p = config.hardware, config.prpo
    zero = zero_stage_for(config, stage)
    zero_key = "align.zero_stage" if stage == "align" and config.align.zero_stage is not None else "hardware.zero_stage"
    out: list[dict[str, Any]] = []
    if not config.train.grad_checkpointing:
        out.append({"train.grad_checkpointing": True})
    if zero < 3 and hw.nproc_per_node * hw.nnodes > 1:
        out.append({zero_key: 3})
    if zero >= 2 and not hw.offload_optimizer:
        out.append({"hardware.offload_optimizer": True})
    if stage == "prpo":
        out += [{"prpo.images_per_step": n} for n in _halvings(p.images_per_step, 1)]
        out += [{"prpo.group_size": g} for g in _halvings(p.group_size, 2)]
        out += [{"prpo.max_new_tokens": n} for n in _halvings(p.max_new_tokens, 256)]
        if p.beta > 0:  # no KL term, no reference model: a change of objective, so late
            out.append({"prpo.beta": 0.0})
    else:  # the same global batch in smaller micro-batches
        out += [{"hardware.micro_batch": m, "hardware.grad_accum": hw.grad_accum * hw.micro_batch // m}
                for m in _halvings(hw.micro_batch, 1)]
    if zero == 3 and not hw.offload_params:
        out.append({"hardware.offload_params": True})
    return out


def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


def as_flags(change: dict[str, Any]) -> str:
    return " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())
