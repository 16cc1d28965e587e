"""Reward-hacking guard: the paper preset never rates spam or duplicates above the honest answer; the
official preset's known weakness (extra boxes are free for precision) is visible."""

import random

import pytest

from megatron_vr1.benchmarks.reward_hacking import hacking_table
from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import RefinementSchedule, score_batch, target_from_row
from megatron_vr1.rewards.synthetic import attacks, make_row

SPAM_LIKE = ("box spam 5x", "box spam 20x", "duplicates of best box", "one giant box", "giant box per label",
             "empty list []", "object {}")


@pytest.mark.parametrize("step", [None, 0, 2000])
@pytest.mark.parametrize("gt_boxes", [1, 4, 12])
def test_paper_never_rates_an_attack_above_honest_per_query(step, gt_boxes):
    rng = random.Random(gt_boxes)
    cfg = RewardConfig(preset="paper")
    sched = RefinementSchedule.from_config(cfg, total_steps=3000)
    for _ in range(20):
        row = make_row(rng, gt_boxes)
        answers = attacks(row, rng, jitter=6.0)
        t = target_from_row(row)
        outs = dict(zip(answers, score_batch(list(answers.values()), [t] * len(answers), cfg, step, schedule=sched)))
        for kind in SPAM_LIKE:
            assert outs[kind].total <= outs["honest"].total + 1e-12, (kind, outs[kind], outs["honest"])


def test_official_spam_beats_honest_and_paper_does_not():
    off = hacking_table("official", rows=32, gt_boxes=4, jitter=6.0, step=None, total_steps=3000, seed=0)
    pap = hacking_table("paper", rows=32, gt_boxes=4, jitter=6.0, step=None, total_steps=3000, seed=0)
    assert off["box spam 20x"][3] > off["honest"][3]  # the released reward's hacking surface
    assert off["box spam 20x"][2] > off["honest"][2]  # ... through precision over matched pairs only
    for kind in SPAM_LIKE:
        assert pap[kind][3] < pap["honest"][3]
    # Labels never enter the reward value in either preset.
    assert off["wrong labels"] == off["honest"] and pap["wrong labels"] == pap["honest"]
