"""The collapse guard inside the RL loop (METHOD.md §12): greedy answers on a fixed probe set of
the run's prompts, a restorable copy of what learns after every healthy probe, and the restore.

Every rank calls every function here at the same step (the probe's counts are summed over ranks,
so every rank reaches the same decision and leaves the loop together).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dxcli.base.answer import parse_answer
from dxcli.base.images import load_rgb
from dxcli.config import PrpoConfig
from dxcli.model.generate import generate
from dxcli.rl.guard import ProbeMix, drift
from dxcli.runtime.dist import Dist, all_reduce_sum
from dxcli.training.engine import weights_for_generation

# A healthy copy larger than this (per rank) goes to RUN/guard/ on disk instead of host memory:
# LoRA adapters (tens of MB at 7B) and the tiny model stay in memory; a full 7B policy under ZeRO-2
# (13.5 GB of bf16 weights on every rank) is written to disk, once per healthy probe.
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3
VERDICT_SLOT = {"real": 0, "fake": 1, None: 2}


def probe_set(records: list, size: int, seed: int, dist: Dist) -> list:
    """This rank's share of the probe: the same `size` records on every rank (a seeded draw from
    all of the run's prompts), dealt out rank by rank."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[:size]][dist.rank::dist.world]


def probe_mix(engine, bundle, records: list, images_root: Path, *, max_new_tokens: int, batch_size: int,
              dist: Dist) -> ProbeMix:
    """Greedy verdicts of the current policy on `records`, counted over every rank."""
    counts = [0.0, 0.0, 0.0]
    bundle.model.eval()
    with weights_for_generation(engine):  # a collective under ZeRO-3: every rank enters it
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            gen = generate(bundle, [load_rgb(Path(images_root) / r.image) for r in chunk],
                           [r.question for r in chunk], max_new_tokens=max_new_tokens, temperature=0.0)
            for text in gen.texts:
                counts[VERDICT_SLOT[parse_answer(text)]] += 1
    real, fake, invalid = all_reduce_sum(counts, dist)
    return ProbeMix(int(real), int(fake), int(invalid))


class HealthyCopy:
    """This rank's trainable tensors as of the last healthy probe. Under ZeRO-3 each rank keeps
    its own partition (`ds_tensor`), which is all the final gathered save reads back."""

    def __init__(self, folder: Path, dist: Dist) -> None:
        self.path = Path(folder) / f"healthy-rank{dist.rank}.pt"
        self.tensors: list[torch.Tensor] | None = None

    @staticmethod
    def _storage(model) -> list[torch.Tensor]:
        return [getattr(p, "ds_tensor", p.data) for p in model.parameters() if p.requires_grad]

    def take(self, model) -> None:
        tensors = [t.detach().to("cpu", copy=True) for t in self._storage(model)]
        if sum(t.numel() * t.element_size() for t in tensors) <= IN_MEMORY_LIMIT_BYTES:
            self.tensors = tensors
            return
        self.tensors = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(tensors, partial)
        os.replace(partial, self.path)  # a crash mid-write leaves the previous healthy copy whole

    @torch.no_grad()
    def restore(self, model) -> None:
        tensors = self.tensors if self.tensors is not None else torch.load(self.path, weights_only=True)
        for target, saved in zip(self._storage(model), tensors, strict=True):
            target.copy_(saved.to(target.device))


@dataclass
class Guard:
    """The guard's state for one run: its probe, the start's answers, the copy, the verdict."""

    probe: list
    start: ProbeMix
    copy: HealthyCopy
    healthy_step: int = 0
    tripped: dict[str, Any] | None = field(default=None)

    def check(self, now: ProbeMix, step: int, cfg: PrpoConfig, model) -> bool:
        """After a probe at `step`: keep a copy when healthy; record the collapse and return True when not."""
        reason = drift(self.start, now, min_class_share=cfg.guard_min_class_share,
                       max_invalid_rise=cfg.guard_max_invalid_rise)
        if reason is None:
            self.copy.take(model)
            self.healthy_step = step
            return False
        self.tripped = {"step": step, "restored_step": self.healthy_step, "reason": reason,
                        "start": self.start.to_json(), "probe": now.to_json()}
        return True


def guard_due(step: int, total_steps: int, every: int) -> bool:
    """Probe every `every` steps and after the last one (a collapse in the final steps counts too)."""
    return step % every == 0 or step == total_steps
