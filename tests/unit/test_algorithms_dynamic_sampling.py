"""Dynamic-sampling bookkeeping: exactly the all-equal groups are dropped, refills are counted, surplus is
discarded, the round cap yields a partial batch, and the counters survive a state_dict round trip."""

import json

import pytest

from megatron_vr1.algorithms import DynamicSampler, zero_variance_groups


def _round(names, rewards, group_size=2):
    flags = zero_variance_groups(rewards=rewards, group_size=group_size).tolist()
    return names, flags


def test_drops_exactly_the_all_equal_groups_and_refills():
    sampler = DynamicSampler(target_groups=3)
    # groups a, c are all-equal (dropped); b, d informative
    names, flags = _round(["a", "b", "c", "d"], [1.0, 1.0, 0.0, 1.0, 0.3, 0.3, 2.0, 0.5])
    assert flags == [True, False, True, False]
    assert sampler.add(names, zero_variance=flags) == 2
    assert not sampler.ready()
    with pytest.raises(RuntimeError, match="before ready"):
        sampler.pop_batch()
    names, flags = _round(["e", "f", "g"], [0.0, 0.0, 0.1, 0.2, 0.9, 1.0])  # e dropped; f, g kept
    sampler.add(names, zero_variance=flags)
    assert sampler.ready()
    assert sampler.pop_batch() == ["b", "d", "f"]
    assert sampler.counters == {"groups_seen": 7, "groups_dropped": 3, "groups_kept": 3, "groups_surplus": 1,
                                "refill_rounds": 1, "batches": 1, "partial_batches": 0}
    assert sampler.num_buffered == 0


def test_round_cap_gives_a_partial_batch():
    sampler = DynamicSampler(target_groups=4, max_rounds=2)
    sampler.add(["a", "b"], zero_variance=[True, False])
    sampler.add(["c", "d"], zero_variance=[True, True])
    assert sampler.ready()
    assert sampler.pop_batch() == ["b"]
    assert sampler.counters["partial_batches"] == 1 and sampler.counters["refill_rounds"] == 1
    # next batch starts a fresh round count: its first add is not a refill
    sampler.add(["e", "f", "g", "h"], zero_variance=[False] * 4)
    assert sampler.pop_batch() == ["e", "f", "g", "h"]
    assert sampler.counters["refill_rounds"] == 1 and sampler.counters["batches"] == 2


def test_state_dict_round_trip_is_json():
    sampler = DynamicSampler(target_groups=1)
    sampler.add(["a", "b"], zero_variance=[True, False])
    sampler.pop_batch()
    state = json.loads(json.dumps(sampler.state_dict()))
    restored = DynamicSampler(target_groups=1)
    restored.load_state_dict(state)
    assert restored.counters == sampler.counters
    sampler.add(["c"], zero_variance=[False])
    with pytest.raises(RuntimeError, match="mid-batch"):
        sampler.state_dict()
    with pytest.raises(ValueError, match="one flag per group"):
        restored.add(["x", "y"], zero_variance=[False])
