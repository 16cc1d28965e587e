"""``megatron-vr1 bench reward-hacking``: the reward of adversarial answers next to the honest answer.

For each preset, the mean total reward over synthetic rows (and its parts) of: the honest answer (the
ground truth written back with a few pixels of jitter, as a good policy would), ``[]``, ``{}``, box spam
at 5x and 20x the ground-truth count (the honest boxes plus more jittered guesses per object), duplicates of the first
box, one giant box, one giant box per label and the honest boxes with a wrong label. Labels never enter
the reward value (only the released matching cost), so "wrong labels" ties with the honest answer. An attack rated
above the honest answer is flagged.
"""

from __future__ import annotations

import argparse
import random

from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import score_batch, target_from_row
from megatron_vr1.rewards.synthetic import attacks, make_row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=64, help="synthetic queries to average over (default 64)")
    parser.add_argument("--gt-boxes", type=int, default=4, help="ground-truth boxes per query (default 4)")
    parser.add_argument("--jitter", type=float, default=6.0, help="honest answer's max error in pixels (default 6)")
    parser.add_argument("--step", type=int, default=None, help="training step (default: none)")
    parser.add_argument("--total-steps", type=int, default=3000, help="run length for fraction schedules")
    parser.add_argument("--seed", type=int, default=0)


def hacking_table(preset: str, *, rows: int, gt_boxes: int, jitter: float, step: int | None,
                  total_steps: int, seed: int) -> dict[str, tuple[float, float, float, float]]:
    """Mean (format, recall, precision, total) of each answer kind under ``preset``."""
    from megatron_vr1.rewards.schedule import RefinementSchedule

    rng = random.Random(seed)
    cfg = RewardConfig(preset=preset)
    schedule = RefinementSchedule.from_config(cfg, total_steps=total_steps)
    data = [make_row(rng, gt_boxes) for _ in range(rows)]
    per_kind: dict[str, list[str]] = {}
    for row in data:
        for kind, text in attacks(row, rng, jitter).items():
            per_kind.setdefault(kind, []).append(text)
    targets = [target_from_row(r) for r in data]
    table = {}
    for kind, texts in per_kind.items():
        out = score_batch(texts, targets, cfg, step, schedule=schedule)
        n = len(out)
        table[kind] = (sum(o.format for o in out) / n, sum(o.recall for o in out) / n,
                       sum(o.precision for o in out) / n, sum(o.total for o in out) / n)
    return table


def run(args: argparse.Namespace) -> int:
    print(f"reward of adversarial answers vs the honest answer: {args.rows} synthetic queries x {args.gt_boxes} "
          f"GT boxes, honest jitter <= {args.jitter:g} px, step={args.step}")
    for preset in ("official", "paper"):
        table = hacking_table(preset, rows=args.rows, gt_boxes=args.gt_boxes, jitter=args.jitter, step=args.step,
                              total_steps=args.total_steps, seed=args.seed)
        honest = table["honest"][3]
        print(f"\npreset {preset}")
        print(f"| {'answer':<24} | format | recall | precision | total  | vs honest |")
        print(f"|{'-' * 26}|--------|--------|-----------|--------|-----------|")
        flagged = []
        for kind, (f, r, p, t) in table.items():
            mark = "ABOVE" if kind != "honest" and t > honest + 1e-9 else ""
            if mark:
                flagged.append(kind)
            print(f"| {kind:<24} | {f:6.3f} | {r:6.3f} | {p:9.3f} | {t:6.3f} | {t - honest:+8.3f} {mark}")
        if flagged:
            print(f"note: under {preset!r} these attacks score above the honest answer: {', '.join(flagged)}")
        else:
            print(f"note: under {preset!r} no attack scores above the honest answer")
    return 0
