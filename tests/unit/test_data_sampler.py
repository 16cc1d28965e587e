"""The sharded sampler: deterministic, reshuffled per epoch, disjoint shards, exact resume."""

from __future__ import annotations

from itertools import islice

import pytest

from megatron_vr1.data.sampler import ShardedSampler


def test_shards_are_disjoint_equal_and_reshuffled_per_epoch():
    world = 3
    samplers = [ShardedSampler(50, rank=r, world_size=world, seed=7) for r in range(world)]
    per_rank = 50 // world
    epochs = [[list(islice(iter(s), per_rank)) for s in samplers] for _ in range(2)]
    for epoch, shards in enumerate(epochs):
        idx = [i for shard in shards for e, i in shard]
        assert all(e == epoch for shard in shards for e, _ in shard)
        assert len(idx) == len(set(idx)) == per_rank * world  # disjoint, no duplicates
    assert [i for _, i in epochs[0][0]] != [i for _, i in epochs[1][0]]
    again = ShardedSampler(50, rank=1, world_size=world, seed=7)
    assert list(islice(iter(again), per_rank)) == epochs[0][1]
    other_seed = ShardedSampler(50, rank=1, world_size=world, seed=8)
    assert list(islice(iter(other_seed), per_rank)) != epochs[0][1]


def test_resume_from_state_dict_continues_exactly():
    full = list(islice(iter(ShardedSampler(20, rank=1, world_size=2, seed=3)), 37))
    first = ShardedSampler(20, rank=1, world_size=2, seed=3)
    it = iter(first)
    head = [next(it) for _ in range(13)]
    state = first.state_dict()
    resumed = ShardedSampler(20, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    assert head + list(islice(iter(resumed), 24)) == full
    with pytest.raises(ValueError, match="world_size"):
        ShardedSampler(20, rank=0, world_size=4, seed=3).load_state_dict(state)


def test_invalid_sharding_is_refused():
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_items"):
        ShardedSampler(1, rank=0, world_size=2)
