"""The checkpoint side of the memory plan: what one resumable DeepSpeed checkpoint of a stage
writes (training.state.save_training_state) and how long writing it takes, so that a profile's
train.save_every_minutes can be chosen from the checkpoint's size. Sizes are GB (1e9 bytes), as
disks are sold and their throughput quoted; hardware.checkpoint_write_gbps is the assumed speed."""

from __future__ import annotations

from dataclasses import dataclass

from dxcli.config import DxConfig

# A checkpoint's optimizer files: fp32 master weights + Adam m + v per trainable parameter (an fp32
# run: its fp32 partition + m + v, the same 12 B). Measured on DeepSpeed's files: tests/test_memory_plan.py.
OPTIMIZER_CHECKPOINT_BYTES = 12
# The share of training time checkpoint writing may take: the GPU profiles' cadence keeps under it.
CHECKPOINT_SHARE_TARGET = 0.05


@dataclass(frozen=True)
class CheckpointPlan:
    """One resumable checkpoint of a stage (every rank's files together) and what writing it costs."""

    parts: tuple[tuple[str, float], ...]  # (what, bytes)
    write_gbps: float  # hardware.checkpoint_write_gbps
    every_minutes: float  # train.save_every_minutes
    every_steps: int  # train.save_every
    keep: int  # train.keep_checkpoints

    @property
    def nbytes(self) -> float:
        return sum(n for _, n in self.parts)

    @property
    def write_s(self) -> float:
        return self.nbytes / (self.write_gbps * 1e9)

    @property
    def share(self) -> float | None:
        """Share of wall time spent writing under the minutes cadence (its timer restarts after
        each save, runtime.interrupt); None when only steps or the end trigger a save."""
        if self.every_minutes <= 0:
            return None
        return self.write_s / (self.every_minutes * 60 + self.write_s)

    def describe(self) -> str:
        gb = self.nbytes / 1e9
        parts = " + ".join(f"{n / 1e9:.1f} {what}" for what, n in self.parts)
        when = f"every {self.every_minutes:g} min (train.save_every_minutes)" if self.every_minutes else "no timer"
        if self.every_steps:
            when += f", every {self.every_steps} steps (train.save_every)"
        share = f": {100 * self.share:.1f}% of training time" if self.share is not None else ""
        return (f"checkpoint {gb:.1f} GB ({parts}), ~{self.write_s:.0f} s at {self.write_gbps:g} GB/s "
                f"(hardware.checkpoint_write_gbps); {when}{share}; disk while saving {self.keep + 1} x {gb:.1f} "
                f"= {(self.keep + 1) * gb:.0f} GB (train.keep_checkpoints={self.keep})")


def checkpoint_parts(zero: int, nbytes: int, trainable: int) -> list[tuple[str, float]]:
    """Bytes of one DeepSpeed checkpoint as training.state saves it (engine._save_checkpoint with
    exclude_frozen_parameters whenever some weights are frozen): the optimizer files, 12 B per
    trainable parameter, and below ZeRO-3 the module's state dict of the trainable weights in the
    training dtype (under ZeRO-3 parameters are partitioned away from it). Frozen weights are the
    starting checkpoint's and are not written."""
    parts = [(f"optimizer ({OPTIMIZER_CHECKPOINT_BYTES} B x {trainable / 1e6:,.1f}M trainable)",
              float(OPTIMIZER_CHECKPOINT_BYTES * trainable))]
    if zero < 3:
        parts.append(("weights", float(nbytes * trainable)))
    return parts


def plan_checkpoint(config: DxConfig, *, zero: int, nbytes: int, trainable: int) -> CheckpointPlan:
    """The checkpoint of a stage that trains `trainable` parameters under ZeRO `zero`."""
    train = config.train
    return CheckpointPlan(tuple(checkpoint_parts(zero, nbytes, trainable)),
                          config.hardware.checkpoint_write_gbps, train.save_every_minutes, train.save_every,
                          train.keep_checkpoints)
