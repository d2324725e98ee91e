"""The data order of every training loop: each rank its own shard, together the whole data set."""

from __future__ import annotations

import pytest

from dxcli.training.sampler import ResumableShardSampler


@pytest.mark.parametrize("size,world", [(10, 2), (11, 2), (13, 4), (5, 1)])
def test_shards_are_disjoint_and_cover_the_data(size: int, world: int):
    shards = [ResumableShardSampler(size, rank, world, seed=3).shard(epoch=1) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # ranks step together
    covered = [i for shard in shards for i in shard]
    assert set(covered) == set(range(size))
    padding = len(covered) - size  # the wrap-around that evens the shards out is the only repeat
    assert padding < world and len(covered) - len(set(covered)) == padding
    if size % world == 0:
        assert len(set(covered)) == len(covered)


def test_resuming_mid_epoch_yields_the_rest_of_the_same_order():
    sampler = ResumableShardSampler(20, 1, 2, seed=0)
    sampler.set_position(epoch=2, start=0)
    whole = list(sampler)
    sampler.set_position(epoch=2, start=4)
    assert list(sampler) == whole[4:] and len(sampler) == len(whole) - 4
    sampler.set_position(epoch=3, start=0)
    assert list(sampler) != whole  # a new epoch reshuffles
