"""Dynamic sampling inside the GRPO loop's sampling step: groups whose completions all score the same are
dropped, fresh prompts refill the batch, the round cap yields a partial batch, and every sampled group is still
reported for logging. The rewards are the real RewardWorker's; the engine is a scripted RolloutEngine that
answers each prompt either with its ground truth G times (a flat group) or with a mix of the ground truth and an
unparsable answer (an informative group), so the expected batch is known exactly."""

from __future__ import annotations

import itertools

import pytest

from training_data import make_sample, run_config, tiny_hf_dir


class ScriptedEngine:
    """RolloutEngine whose answers depend on the sample index: even -> flat group, odd -> informative."""

    weight_version = 0

    def __init__(self):
        self.calls: list[int] = []

    def generate(self, requests):
        from megatron_vr1.data.prompts import sample_sft_target
        from megatron_vr1.types import Completion

        self.calls.append(len(requests))
        out = []
        for req in requests:
            index = int(req.sample_id.rsplit("-", 1)[1])
            right = sample_sft_target(make_sample(index))
            texts = [right] * req.sampling.n if index % 2 == 0 else [right if i % 2 else "no boxes"
                                                                     for i in range(req.sampling.n)]
            out.append([Completion(sample_id=req.sample_id, request_id=f"{req.request_id}-{i}", text=t,
                                   token_ids=(1, 2), logprobs=(-1.0, -1.0), finish_reason="stop", weight_version=0)
                        for i, t in enumerate(texts)])
        return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_dir(tmp_path_factory.mktemp("dyn")))


def _step(tokenizer, tmp_path, *, dynamic: bool, max_rounds: int = 4, prompts_per_step: int = 3):
    from megatron_vr1.algorithms.dynamic_sampling import DynamicSampler
    from megatron_vr1.rewards.worker import RewardWorker
    from megatron_vr1.training.loop import sample_step

    cfg = run_config(tmp_path, tmp_path / "run", prompts_per_step=prompts_per_step, num_generations=4,
                     dynamic_sampling=dynamic, dynamic_sampling_max_rounds=max_rounds)
    sampler = DynamicSampler(target_groups=prompts_per_step, max_rounds=max_rounds) if dynamic else None
    engine, samples = ScriptedEngine(), (make_sample(i) for i in itertools.count())
    with RewardWorker(cfg.reward) as worker:
        kept, groups, rewards, zero_var = sample_step(engine, samples, tokenizer, cfg, worker, 1, sampler)
    return engine, sampler, kept, groups, rewards, zero_var


def test_without_dynamic_sampling_one_round_is_the_batch(tokenizer, tmp_path):
    engine, _s, kept, groups, rewards, zero_var = _step(tokenizer, tmp_path, dynamic=False)
    assert [k.prompt.sample.sample_id for k in kept] == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert zero_var.tolist() == [True, False, True] and len(rewards) == 12 and len(groups) == 3
    assert all(float(k.advantages.abs().sum()) == 0 for k in kept[::2])  # flat groups carry no signal


def test_flat_groups_are_dropped_and_refilled_with_fresh_prompts(tokenizer, tmp_path):
    engine, sampler, kept, groups, rewards, zero_var = _step(tokenizer, tmp_path, dynamic=True)
    # round 1: samples 0,1,2 -> keeps 1; round 2: 3,4 -> keeps 3; round 3: 5 -> keeps 5
    assert [k.prompt.sample.sample_id for k in kept] == ["synthetic-1", "synthetic-3", "synthetic-5"]
    assert engine.calls and sum(engine.calls) == 6  # 3 + 2 + 1 prompts, each seen once
    assert all(float(k.advantages.abs().sum()) > 0 for k in kept)
    assert len(groups) == 6 and len(rewards) == 24 and int(zero_var.sum()) == 3  # all sampled groups reported
    assert sampler.counters["refill_rounds"] == 2 and sampler.counters["groups_dropped"] == 3
    assert sampler.counters["partial_batches"] == 0


def test_round_cap_gives_a_partial_batch(tokenizer, tmp_path):
    _engine, sampler, kept, groups, _r, _z = _step(tokenizer, tmp_path, dynamic=True, max_rounds=2)
    assert [k.prompt.sample.sample_id for k in kept] == ["synthetic-1", "synthetic-3"]
    assert sampler.counters["partial_batches"] == 1 and len(groups) == 5
