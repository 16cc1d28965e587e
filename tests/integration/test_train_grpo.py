"""A short end-to-end Vision-R1 GRPO run on CPU: synthetic shape data -> in-process HFEngine rollout -> rewards in
the RewardWorker -> advantages -> Megatron update -> weight sync into the engine -> metrics.jsonl, checkpoint.
After the run the engine's weights equal the policy's (teacher-forced logprobs agree). A malformed dataset row
mid-epoch is skipped and counted (on_bad_row=skip) or stops the run with a RowError naming file/row/field."""

from __future__ import annotations

import json

import pytest

from training_data import run_config, tiny_hf_dir, world_of_one

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world():
    with world_of_one():
        yield


def _data(tmp_path, bad_row_at: int | None = None, n: int = 4):
    from megatron_vr1.data.synth import build_synth

    paths = build_synth(tmp_path / "data", n=n, seed=0, difficulty="demo", n_val=2)
    if bad_row_at is not None:
        lines = paths["train"].read_text().splitlines()
        lines.insert(bad_row_at, json.dumps({"problem": "x", "image": json.loads(lines[0])["image"],
                                             "solution": "not json", "width": 56, "height": 56}))
        paths["train"].write_text("\n".join(lines) + "\n")
    return paths


def _run(tmp_path, paths, on_bad_row="skip", steps=2):
    from megatron_vr1.data.dataset import LocalizationDataset
    from megatron_vr1.rollout.hf_engine import HFEngine
    from megatron_vr1.training.loop import grpo_train
    from megatron_vr1.training.policy import Policy

    hf_dir = tiny_hf_dir(tmp_path)
    cfg = run_config(hf_dir, tmp_path / "run", train_steps=steps, beta=0.04, lr=1e-3)
    cfg.data.train_path, cfg.data.on_bad_row = str(paths["train"]), on_bad_row
    dataset = LocalizationDataset.from_config(cfg.data, cfg.data.train_path)
    engine = HFEngine(hf_dir, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    policy = Policy(cfg)
    records = grpo_train(cfg, policy, engine, iter(dataset), tokenizer=engine.tokenizer, eos_ids=engine.eos_ids,
                         dataset=dataset)
    return cfg, policy, engine, dataset, records


def test_grpo_run_end_to_end_with_hf_engine(world, tmp_path):
    from megatron_vr1.training.batch import build_train_batch, prepare_prompt
    from megatron_vr1.training.metrics import read_metrics
    from megatron_vr1.training.state import logprob_gap

    # 4 good rows + 1 bad; 3 steps x 2 prompts read 6 rows, so the bad row is met whatever the shuffle.
    paths = _data(tmp_path, bad_row_at=2)
    cfg, policy, engine, dataset, records = _run(tmp_path, paths, on_bad_row="skip", steps=3)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert engine.weight_version == 3 and records[-1]["weight_version"] == 3
    assert dataset.epoch_reports and dataset.epoch_reports[0].skipped == 1
    for r in records:
        assert 0.0 <= r["reward/total"] <= 3.0 and r["rollout/length_mean"] > 0
        assert r["rollout/weight_version_lag"] == 0  # on-policy: sampled by the weights of the step before
        if "train/logprob_gap_abs_mean" in r:
            assert r["train/logprob_gap_abs_mean"] < 1e-2  # the engine sampled with the policy's weights
    assert [r["step"] for r in read_metrics(cfg.log.run_dir)] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert any((tmp_path / "run" / "tensorboard").iterdir())

    # After the last sync the engine holds the policy's weights: teacher-forced logprobs agree.
    sample = next(iter(dataset.iter_epoch(0)))
    prep = prepare_prompt(sample, engine.tokenizer, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    from megatron_vr1.rollout.engine import GenerationRequest, SamplingParams
    from megatron_vr1.types import RolloutGroup

    comps = engine.generate([GenerationRequest(request_id="chk", sample_id=sample.sample_id, prompt=prep.prompt,
                                               image=sample.image, sampling=SamplingParams(n=2, max_new_tokens=8))])[0]
    import torch

    batch = build_train_batch([RolloutGroup(sample=sample, completions=tuple(comps))], [prep], torch.zeros(2),
                              eos_ids=engine.eos_ids)
    assert logprob_gap(policy, engine, batch, [prep, prep]) < 1e-2


def test_malformed_row_stops_run_when_configured(world, tmp_path):
    from megatron_vr1.data.schema import RowError

    paths = _data(tmp_path, bad_row_at=1)  # 5 rows, 3 steps x 2 prompts: the bad row is always reached
    with pytest.raises(RowError, match=r"train.jsonl row \d+ field"):
        _run(tmp_path, paths, on_bad_row="error", steps=3)
