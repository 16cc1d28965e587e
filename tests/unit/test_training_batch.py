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
    assert batch.pixel_values.shape == (16, 1176) and batch.image_grid_thw.tolist() == [[1, 2, 2]] * 4
    assert batch.pixel_values[8:12].eq(1.0).all()  # row 2 is sample 1's image


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


def test_minibatch_rows_split_whole_groups_evenly():
    from megatron_vr1.training.loop import minibatch_rows

    assert minibatch_rows(8, 2, 1) == [list(range(8))]
    assert minibatch_rows(8, 2, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    uneven = minibatch_rows(12, 2, 4)  # 6 groups in 4 mini-batches: 1 or 2 groups each, in order
    assert sum(uneven, []) == list(range(12)) and sorted(len(mb) for mb in uneven) == [2, 2, 4, 4]
    assert minibatch_rows(4, 2, 4) == [[0, 1], [2, 3]]  # a short dynamic-sampling batch: no empty mini-batch
    rows = minibatch_rows(48, 8, 3)
    assert sorted(r for mb in rows for r in mb) == list(range(48)) and all(len(mb) % 8 == 0 for mb in rows)


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
