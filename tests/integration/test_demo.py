"""``megatron-vr1 demo``'s orchestration end to end, shrunk to seconds: synthetic data -> eval of the warm start
-> GRPO and continued SFT for the same time budget -> eval of both -> summary.json with the issue's keys, a
table and plots. The warm start here is a random tiny model and GRPO uses the in-process HF engine (the SGLang
path of the same recipe is tested in test_train_sglang.py); the real demo's numbers come from `make demo`."""

from __future__ import annotations

import json

import pytest

from training_data import tiny_hf_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_every_stage_and_writes_the_summary(tmp_path):
    from megatron_vr1.demo import DemoConfig, run_demo, summary_table

    small = ("grpo.prompts_per_step=2", "rollout.max_new_tokens=8", "checkpoint.keep_last=1")
    cfg = DemoConfig(out=tmp_path / "demo", warmstart=tiny_hf_dir(tmp_path), budget_s=2.0, n_train=8, n_val=3,
                     grpo_sets=small + ("rollout.engine=hf", "grpo.num_generations=2", "reward.label_rule=match"),
                     sft_sets=small)
    summary = run_demo(cfg)
    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("map_start", "map_sft_continued", "map_grpo"):
        assert 0.0 <= summary[key] <= 1.0
    for model in ("start", "grpo", "sft_continued"):
        # Scored with GRPO's criteria (labels must match) and with the official preset, which ignores labels.
        assert 0.0 <= summary[f"reward_{model}"] <= summary[f"reward_official_{model}"] <= 3.0
    assert summary["reward_label_rule"] == "match"
    assert summary["steps_grpo"] >= 1 and summary["steps_sft_continued"] >= 1 and summary["wall_s"] > 0
    assert set(summary["checks"]) == {"grpo_map_gain_ge_0.02", "grpo_reward_up", "wall_le_1200s",
                                      "grpo_beats_continued_sft"}
    out = tmp_path / "demo"
    assert (out / "table.md").read_text().strip() == summary_table(summary)
    assert (out / "plots" / "comparison.png").stat().st_size > 0
    assert any((out / "plots" / "grpo").glob("*.png")) and any((out / "plots" / "sft_continued").glob("*.png"))
    for run in ("grpo", "sft_continued"):  # each run stopped on its time budget and saved its last step
        assert (out / run / "checkpoints" / "latest").exists()


def test_demo_without_a_warm_start_says_how_to_make_one(tmp_path):
    from megatron_vr1.demo import DemoConfig, DemoError, run_demo

    with pytest.raises(DemoError, match="make warmstart"):
        run_demo(DemoConfig(out=tmp_path / "demo", warmstart=tmp_path / "missing"))
