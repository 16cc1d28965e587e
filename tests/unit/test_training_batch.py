"""TrainBatch assembly (loss mask to the first EOS, overlong filter, dropped empty rows, prompt-id check,
alignment of rollout logprobs) and the metrics file reader. Fast: no megatron, one tiny tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_vr1.training.batch import PreparedPrompt, build_train_batch, completion_mask_length
from megatron_vr1.training.metrics import MetricsLogger, read_metrics
from megatron_vr1.types import Completion, GroundTruth, RolloutGroup, Sample

EOS = 2


def _sample(i=0):
    return Sample(sample_id=f"s{i}", problem="p", image=b"", solution=(GroundTruth(label="a", box=(0, 0, 1, 1)),),
                  width=28, height=28, input_width=28, input_height=28, num_instances=1, target_id_maps={"a": 1})


def _prep(n_prompt=5, i=0):
    return PreparedPrompt(sample=_sample(i), prompt="x", prompt_ids=tuple(range(100, 100 + n_prompt)),
                          pixel_values=torch.full((4, 1176), float(i)), image_grid_thw=(1, 2, 2))


def _comp(ids, reason="stop", prompt_ids=(), version=0):
    return Completion(sample_id="s", request_id="r", text="", token_ids=tuple(ids),
                      logprobs=tuple(-0.1 * (k + 1) for k in range(len(ids))), finish_reason=reason,
                      weight_version=version, prompt_token_ids=tuple(prompt_ids))


def test_completion_mask_stops_after_first_eos():
    assert completion_mask_length([5, 6, EOS, 7, EOS], [EOS]) == 3
    assert completion_mask_length([5, 6, 7], [EOS]) == 3
    assert completion_mask_length([], [EOS]) == 0


def test_build_train_batch_layout_and_alignment():
    groups = [RolloutGroup(sample=_sample(0), completions=(_comp([7, 8, EOS, 9]), _comp([5], version=3))),
              RolloutGroup(sample=_sample(1), completions=(_comp([6, 6, 6], reason="length"), _comp([4, EOS])))]
    batch = build_train_batch(groups, [_prep(5, 0), _prep(3, 1)], torch.tensor([1.0, -1.0, 0.5, -0.5]), eos_ids=[EOS])
    assert batch.input_ids.shape == (4, 8) and batch.lengths.tolist() == [8, 6, 6, 5]
    assert batch.input_ids[0].tolist() == [100, 101, 102, 103, 104, 7, 8, EOS]  # token after EOS dropped
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert batch.loss_mask[3].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]  # right padding is outside the loss
    assert batch.rollout_logprobs[0, 5:8].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.advantages.tolist() == [1.0, -1.0, 0.5, -0.5] and batch.weight_versions == [0, 3, 0, 0]
    # one image per group, rows point at theirs
    assert batch.pixel_values.shape == (8, 1176) and batch.image_grid_thw.tolist() == [[1, 2, 2]] * 2
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and batch.pixel_values[4:8].eq(1.0).all()
    from megatron_vr1.training.batch import row_images

    pixels, grids = row_images(batch, [2, 0])
    assert pixels.shape == (8, 1176) and pixels[:4].eq(1.0).all() and pixels[4:].eq(0.0).all()
    assert grids.tolist() == [[1, 2, 2]] * 2


def test_overlong_filter_drops_truncated_rows_and_all_empty_is_none():
    groups = [RolloutGroup(sample=_sample(), completions=(_comp([6, 6], reason="length"), _comp([4, EOS])))]
    batch = build_train_batch(groups, [_prep()], torch.tensor([1.0, -1.0]), eos_ids=[EOS], overlong_filter=True)
    assert batch.input_ids.shape[0] == 1 and batch.advantages.tolist() == [-1.0]
    empty = [RolloutGroup(sample=_sample(), completions=(_comp([6], reason="length"),))]
    assert build_train_batch(empty, [_prep()], torch.tensor([1.0]), eos_ids=[EOS], overlong_filter=True) is None


def test_completions_with_generated_vision_tokens_stay_out_of_the_loss():
    image_pad = 12  # a vision token generated inside the answer cannot be replayed by the trainer's model
    groups = [RolloutGroup(sample=_sample(), completions=(_comp([7, image_pad, EOS]), _comp([4, EOS]),
                                                          _comp([5, EOS, image_pad])))]
    batch = build_train_batch(groups, [_prep()], torch.tensor([1.0, -1.0, 0.5]), eos_ids=[EOS], vision_ids=[image_pad])
    assert batch.advantages.tolist() == [-1.0, 0.5]  # after the EOS it is outside the loss span: row kept
    assert image_pad not in batch.input_ids.tolist()[0] and image_pad not in batch.input_ids.tolist()[1]


def test_engine_prompt_ids_must_match_and_advantage_count_checked():
    groups = [RolloutGroup(sample=_sample(), completions=(_comp([4, EOS], prompt_ids=[1, 2]),))]
    with pytest.raises(ValueError, match="tokenized the prompt"):
        build_train_batch(groups, [_prep()], torch.tensor([1.0]), eos_ids=[EOS])
    ok = [RolloutGroup(sample=_sample(), completions=(_comp([4, EOS]),))]
    with pytest.raises(ValueError, match="advantages"):
        build_train_batch(ok, [_prep()], torch.tensor([1.0, 2.0]), eos_ids=[EOS])


def test_metrics_logger_jsonl_tensorboard_and_resume_dedup(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=3, tensorboard=True, progress=False)
    log.log(1, {"reward/total": 0.5, "reward/stage": "beginner"})
    log.log(2, {"reward/total": 0.7})
    log.close()
    again = MetricsLogger(tmp_path, total_steps=3, start_step=1, tensorboard=False, progress=False)
    again.log(2, {"reward/total": 0.9})  # a resumed run repeats step 2: the last record wins
    again.close()
    recs = read_metrics(tmp_path)
    assert [(r["step"], r["reward/total"]) for r in recs] == [(1, 0.5), (2, 0.9)]
    assert any((tmp_path / "tensorboard").iterdir())
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\nnot json\n")
    with pytest.raises(ValueError, match="metrics.jsonl line 2"):
        read_metrics(tmp_path)


def test_a_fresh_run_sets_an_earlier_runs_logs_aside(tmp_path):
    """--no-resume into a used run dir: the new run's curve must not mix with the old one (read_metrics used to
    return the new run's steps 1-2 followed by the old run's step 3), and the old logs are kept, not deleted."""
    old = MetricsLogger(tmp_path, total_steps=3, tensorboard=True, progress=False)
    for step in (1, 2, 3):
        old.log(step, {"reward/total": 0.1})
    old.close()
    new = MetricsLogger(tmp_path, total_steps=2, start_step=0, tensorboard=True, progress=False)
    for step in (1, 2):
        new.log(step, {"reward/total": 0.9})
    new.close()
    assert [(r["step"], r["reward/total"]) for r in read_metrics(tmp_path)] == [(1, 0.9), (2, 0.9)]
    kept = [json.loads(line) for line in (tmp_path / "metrics.prev1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3]
    assert any((tmp_path / "tensorboard.prev1").iterdir()) and any((tmp_path / "tensorboard").iterdir())
    third = MetricsLogger(tmp_path, total_steps=1, tensorboard=False, progress=False)
    third.close()
    assert (tmp_path / "metrics.prev2.jsonl").is_file()


def _groups_batch(sizes: list[int]):
    """A batch of len(sizes) groups (group g: sizes[g] completions of g + 1 tokens, image of 4 patches filled
    with g)."""
    groups = [RolloutGroup(sample=_sample(g), completions=tuple(_comp([7] * (g + 1)) for _ in range(n)))
              for g, n in enumerate(sizes)]
    return build_train_batch(groups, [_prep(5, g) for g in range(len(sizes))], torch.arange(sum(sizes)).float(),
                             eos_ids=[EOS])


def test_minibatch_rows_split_whole_groups_evenly():
    from megatron_vr1.training.sharding import minibatch_rows

    assert minibatch_rows(_groups_batch([2] * 4), 1) == [list(range(8))]
    assert minibatch_rows(_groups_batch([2] * 4), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    uneven = minibatch_rows(_groups_batch([2] * 6), 4)  # 6 groups in 4 mini-batches: 1 or 2 groups each, in order
    assert sum(uneven, []) == list(range(12)) and sorted(len(mb) for mb in uneven) == [2, 2, 4, 4]
    assert minibatch_rows(_groups_batch([2] * 2), 4) == [[0, 1], [2, 3]]  # a short batch: no empty mini-batch
    short = minibatch_rows(_groups_batch([3, 1, 2]), 3)  # rows dropped from a group: still whole groups
    assert short == [[0, 1, 2], [3], [4, 5]]


def test_shards_hold_whole_groups_and_each_image_once():
    from megatron_vr1.training.sharding import shard_batch

    batch = _groups_batch([4] * 8)  # 8 groups x 4 completions, 2 mini-batches, 2 data-parallel ranks
    shards = shard_batch(batch, 2, minibatches=2)
    assert len(shards) == 2 and all(len(s.minibatches) == 2 for s in shards)
    for d, shard in enumerate(shards):
        local = shard.batch
        assert local.input_ids.shape[0] == 16 and local.image_grid_thw.shape[0] == 4  # 4 groups, 4 images
        assert local.pixel_values.shape[0] == 4 * 4
        # mini-batch 0 of the step is groups 0-3: rank 0 has groups 0 and 2, rank 1 groups 1 and 3
        firsts = [int(local.pixel_values[4 * g, 0]) for g in range(4)]
        assert firsts == [d, d + 2, d + 4, d + 6]
        assert local.advantages[shard.minibatches[0]].tolist() == [float(r) for g in (d, d + 2)
                                                                  for r in range(4 * g, 4 * g + 4)]
    assert shards[0].totals == shards[1].totals == [(16, float(sum(4 * (g + 1) for g in range(4)))),
                                                    (16, float(sum(4 * (g + 1) for g in range(4, 8))))]
    # the shards together are the batch, row for row
    rows = sorted(tuple(s.batch.input_ids[r].tolist()) for s in shards for r in range(16))
    assert rows == sorted(tuple(r.tolist()) for r in batch.input_ids)


def test_shards_of_a_short_batch():
    from megatron_vr1.training.sharding import shard_batch

    few = shard_batch(_groups_batch([3]), 2, minibatches=1)  # one group, two ranks: its rows split, image to both
    assert [s.batch.input_ids.shape[0] for s in few] == [2, 1] and all(s.batch.image_grid_thw.shape[0] == 1
                                                                        for s in few)
    fewer_mbs = shard_batch(_groups_batch([1, 1, 2]), 2, minibatches=3)  # 1-row mini-batches cannot feed 2 ranks
    assert len(fewer_mbs[0].minibatches) == 2
    assert shard_batch(_groups_batch([1]), 2) is None  # one sequence for two ranks: no update


def test_minibatches_config_is_validated_and_sets_the_schedule_length():
    from megatron_vr1.config.base import ConfigError
    from megatron_vr1.config.grpo import GRPOConfig

    g = GRPOConfig(prompts_per_step=16, minibatches=4, updates_per_batch=2, train_steps=10)
    assert (g.steps_per_batch, g.optimizer_steps) == (8, 80)
    with pytest.raises(ConfigError, match="divisor"):
        GRPOConfig(prompts_per_step=16, minibatches=3)
    with pytest.raises(ConfigError, match="SFT takes one optimiser step"):
        GRPOConfig(mode="sft", minibatches=2)
    with pytest.raises(ConfigError, match="stop_at_step"):
        GRPOConfig(train_steps=10, stop_at_step=11)
