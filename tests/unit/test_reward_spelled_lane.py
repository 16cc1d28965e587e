"""The spelled-answer lane of the batched extraction (regex + one numpy parse instead of json.loads) must give
exactly what the JSON lane gives for the same JSON value written another way."""

import dataclasses
import json
import random

import pytest

from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import score_batch, target_from_row
from megatron_vr1.rewards.extract import _SPELLED
from megatron_vr1.rewards.synthetic import make_row, noisy_answer

ODD_LABELS = ["", "  ", " Car ", "PERSON", "a]b", "x, 5, 6]", "{}", "日本", "\U0001F600 dog"]


def _answers(rng: random.Random, n: int) -> tuple[list[str], list[dict]]:
    rows, texts = [], []
    for _ in range(n):
        row = make_row(rng, rng.randint(0, 12))
        text = noisy_answer(row, rng)
        if text.endswith("```") and rng.random() < 0.5:  # odd labels and coordinates, still the spelling
            items = json.loads(text[8:-4])
            for it in items:
                it["label"] = rng.choice(ODD_LABELS + [it["label"]])
                it["bbox_2d"][rng.randrange(4)] = rng.choice([0, -3, 999_999_999_999_999, 5000])
            text = "```json\n" + json.dumps(items, ensure_ascii=False) + "\n```"
        elif text.endswith("```") and rng.random() < 0.3:  # Qwen2.5-VL's layout: one item per line
            items = [json.dumps(it, ensure_ascii=False) for it in json.loads(text[8:-4])]
            text = "```json\n[\n\t" + ",\n\t".join(items) + "\n]\n```"
        rows.append(row)
        texts.append(text)
    return texts, rows


def _respelled(text: str) -> str:
    """The same JSON value without the spaces json.dumps puts after separators: the JSON lane reads it."""
    if not text.endswith("```"):
        return text
    body = json.dumps(json.loads(text.strip()[8:-3]), separators=(",", ":"), ensure_ascii=False)
    return "```json\n" + body + "\n```"


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_spelled_lane_equals_json_lane(preset):
    rng = random.Random(11)
    texts, rows = _answers(rng, 200)
    spelled = [t for t in texts if t.endswith("```") and _SPELLED.fullmatch(t.strip()[8:-3])]
    assert len(spelled) > 150  # the lane is what the first batch exercises
    respelled = [_respelled(t) for t in texts]
    assert not any(_SPELLED.fullmatch(t.strip()[8:-3]) for t in respelled if t.endswith("}]\n```"))
    targets = [target_from_row(r) for r in rows]
    cfg = RewardConfig(preset=preset)
    for step in (None, 0, 2000) if preset == "official" else (None,):
        got = score_batch(texts, targets, cfg, step)
        want = score_batch(respelled, targets, cfg, step)
        assert [dataclasses.astuple(g) for g in got] == [dataclasses.astuple(w) for w in want]


@pytest.mark.parametrize("body", [
    '[{"bbox_2d": [01, 2, 3, 4], "label": "a"}]',            # leading zero: not JSON
    '[{"bbox_2d": [1, 2, 3, 4], "label": "a\\"b"}]',          # escape: JSON decodes it
    '[{"bbox_2d": [1, 2, 3, 1000000000000000], "label": "a"}]',  # beyond the exact-int range of the lane
    '[{"bbox_2d": [1.0, 2, 3, 4], "label": "a"}]',
    '[{"label": "a", "bbox_2d": [1, 2, 3, 4]}]',
    '[{"bbox_2d": [1, 2, 3, 4], "label": "a"},]',
    '[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "a"},\n]',
    '[{"bbox_2d":[1, 2, 3, 4], "label": "a"}]',
])
def test_near_misses_are_not_spelled(body):
    assert _SPELLED.fullmatch(body) is None
