"""The data order every training loop uses: seeded, sharded by rank, resumable mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableShardSampler(Sampler[int]):
    """A seeded per-epoch shuffle, sharded by rank, that can start mid-epoch (for --resume).

    Every rank gets the same number of indices (the shard is padded by wrapping), so ranks step together.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int):
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def shard(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = -(-self.size // self.world)
        order += order[: per_rank * self.world - self.size]
        return order[self.rank::self.world]

    def __len__(self) -> int:
        return -(-self.size // self.world) - self.start

    def __iter__(self):
        return iter(self.shard(self.epoch)[self.start:])
