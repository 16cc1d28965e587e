"""Synthetic ground truth, honest answers and reward-hacking attacks (for benchmarks and tests).

Everything is seeded and built here: no dataset is downloaded. Rows use the ``megatron-vr1 score`` input
schema (Vision-R1 dataset columns plus ``input_width``/``input_height``); answers are Qwen2.5-VL JSON in
resized-input pixels, as the model writes them.
"""

from __future__ import annotations

import json
import random

LABELS = ("person", "car", "dog", "cat", "chair", "bottle", "cup", "bird")


def make_row(rng: random.Random, n_gt: int, width: int = 640, height: int = 480,
             input_width: int = 644, input_height: int = 476) -> dict:
    """A dataset row with ``n_gt`` random ground-truth boxes (original-image pixels)."""
    solution = []
    for _ in range(n_gt):
        w, h = rng.uniform(20, width / 3), rng.uniform(20, height / 3)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        solution.append([rng.choice(LABELS), [[round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1)]]])
    id_map = {label: i + 1 for i, label in enumerate(LABELS)}
    return {"solution": json.dumps(solution), "width": width, "height": height, "input_width": input_width,
            "input_height": input_height, "target_id_maps": json.dumps(id_map), "num_instances": n_gt}


def to_input_pixels(row: dict, box: list[float]) -> list[int]:
    """An original-image box in the model's (resized input) integer pixels."""
    sx, sy = row["input_width"] / row["width"], row["input_height"] / row["height"]
    return [int(round(box[0] * sx)), int(round(box[1] * sy)), int(round(box[2] * sx)), int(round(box[3] * sy))]


def answer(items: list[tuple[list[int], str]], fenced: bool = True) -> str:
    """Qwen2.5-VL JSON answer text for (box in input pixels, label) items, SFT-target layout."""
    body = json.dumps([{"bbox_2d": box, "label": label} for box, label in items])
    return f"```json\n{body}\n```" if fenced else body


def gt_items(row: dict) -> list[tuple[list[float], str]]:
    return [(box, label) for label, boxes in json.loads(row["solution"]) for box in boxes]


def _jitter(row: dict, box: list[int], rng: random.Random, jitter: float) -> list[int]:
    """Move each coordinate by up to ``jitter`` pixels, keeping a valid box inside the input image."""
    iw, ih = row["input_width"], row["input_height"]
    b = [c + int(rng.uniform(-jitter, jitter)) for c in box]
    x1, y1 = min(max(b[0], 0), iw - 2), min(max(b[1], 0), ih - 2)
    return [x1, y1, min(max(b[2], x1 + 1), iw), min(max(b[3], y1 + 1), ih)]


def honest_items(row: dict, rng: random.Random | None = None, jitter: float = 0.0) -> list[tuple[list[int], str]]:
    """The ground truth as the model would write it, each coordinate off by up to ``jitter`` pixels."""
    items = []
    for box, label in gt_items(row):
        b = to_input_pixels(row, box)
        items.append((_jitter(row, b, rng, jitter) if rng is not None and jitter else b, label))
    return items


def honest_answer(row: dict, rng: random.Random | None = None, jitter: float = 0.0) -> str:
    """``honest_items`` as answer text."""
    return answer(honest_items(row, rng, jitter))


def noisy_answer(row: dict, rng: random.Random) -> str:
    """A plausible policy sample: jittered boxes, some missed, some extra, occasionally truncated."""
    items = []
    for box, label in gt_items(row):
        if rng.random() < 0.15:
            continue
        b = to_input_pixels(row, box)
        j = rng.uniform(0, 25)
        b = [c + int(rng.uniform(-j, j)) for c in b]
        items.append((b, label if rng.random() > 0.1 else rng.choice(LABELS)))
    for _ in range(rng.randrange(0, 3)):
        x, y = rng.randrange(0, row["input_width"] - 40), rng.randrange(0, row["input_height"] - 40)
        items.append(([x, y, x + rng.randrange(10, 40), y + rng.randrange(10, 40)], rng.choice(LABELS)))
    text = answer(items)
    if rng.random() < 0.05:
        text = text[: int(len(text) * 0.8)]  # cut at the token limit: the regex fallback recovers it
    return text


def attacks(row: dict, rng: random.Random, jitter: float) -> dict[str, str]:
    """The honest answer and adversarial answers against one row, by name (``bench reward-hacking``)."""
    honest = honest_items(row, rng, jitter)
    n = len(honest)
    iw, ih = row["input_width"], row["input_height"]

    def spam(k: int) -> str:
        # The honest boxes plus k-1 more guesses around each object: more chances to match well.
        items = list(honest)
        for _ in range(k - 1):
            items.extend((_jitter(row, to_input_pixels(row, gt), rng, jitter), lb) for gt, lb in gt_items(row))
        return answer(items)

    return {
        "honest": answer(honest),
        "empty list []": "```json\n[]\n```",
        "object {}": "```json\n{}\n```",
        "box spam 5x": spam(5),
        "box spam 20x": spam(20),
        "duplicates of best box": answer([honest[0]] * max(n, 2) * 3),
        "one giant box": answer([([0, 0, iw, ih], honest[0][1])]),
        "giant box per label": answer([([0, 0, iw, ih], lb) for lb in sorted({lb for _, lb in honest})]),
        "wrong labels": answer([(b, "zzz_not_a_class") for b, _ in honest]),
    }
