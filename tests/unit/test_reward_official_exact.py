"""The batched scorer against the plain per-completion re-implementation of the released code, on policy-like
answers and on the quirks the official preset must keep (regex fallback, int() truncation, loose format...)."""

import json
import random

import pytest

from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import reference, score_batch, target_from_row
from megatron_vr1.rewards.synthetic import make_row, noisy_answer

ROW = dict(solution=json.dumps([["person", [[10, 10, 110, 210]]], ["car", [[200, 50, 400, 150]]]]), width=640,
           height=480, input_width=644, input_height=476, target_id_maps='{"person": 1, "Car": 2}', num_instances=2)
NEG = dict(ROW, solution="[]", num_instances=0)

QUIRKS = [
    '[{"bbox_2d": [12, 12, 109, 203], "label": "person"}]',                      # bare JSON
    '```json\n[{"bbox_2d": [12.9, 12.2, 109.99, 203.5], "label": "person"}]\n```',  # floats: int() truncation
    '[{"bbox_2d": ["12", "12", "109", "203"], "label": "person"}]',               # numeric strings: int() accepts
    '[{"bbox_2d": [12, 12, 109, 203], "label": " PERSON "}]',                     # label strip + lower
    '[{"bbox_2d": [109, 12, 12, 203], "label": "person"}]',                       # x1 > x2: filtered
    '[{"bbox_2d": [12, 12, 109], "label": "person"}]',                            # 3 coords: format 0
    '[{"bbox_2d": [12, 12, 109, 203]}]',                                          # no label: kept, class 0
    '[{"label": "person"}, 5, "x", null]',                                        # junk items: format 1
    '[]', '{}', '', '   ', '```json\n```', '```\n[{"bbox_2d": [1, 2, 3, 4], "label": "car"}]\n```',
    # truncated at the token limit: only the exact spelling is recovered by the regex fallback
    '```json\n[{"bbox_2d": [12, 12, 109, 203], "label": "person"}, {"bbox_2d": [206, 55, 382, 149], "lab',
    '[{"bbox_2d":[12,12,109,203],"label":"person"}, {"bbox_2d": [1000, 5, 1001, 9], "label": "x"',
    '[{"bbox_2d": [12, 12, 1000, 203], "label": "person"}, {"bbox_2d": [1, 1, 1234, 9], "label": "car"',
    '\n```json\n[{"bbox_2d": [12, 12, 109, 203], "label": "person"}]\n```',       # leading newline: format 0
    '```json\n[{"bbox_2d": [12, 12, 109, 203], "label": "person"}]\n```\nextra ```text```',
    '[{"bbox_2d": [12, 12, 109, 203], "label": "person", "bbox_2d": [1, 1, 2, 2]}]',  # duplicate key: last wins
    '[{"bbox_2d": [NaN, 1, 2, 3], "label": "car"}, {"bbox_2d": [Infinity, 1, 2, 3], "label": "car"}]',
    '[{"bbox_2d": [true, 1, 200, 300], "label": "car"}]',
    '[{"bbox_2d": [1e400, 1, 2, 3], "label": "car"}, {"bbox_2d": [206, 55, 382, 149], "label": "car"}]',
    '[{"bbox_2d": [12, 12, 109, 203], "label": "person"}]\r\n',
    '```json\r\n[{"bbox_2d": [12, 12, 109, 203], "label": "person"}]\r\n```',
    '[' * 100000,                                                                  # deep nesting
]


def _check(completions, rows, steps=(None, 0, 2000)):
    targets = [target_from_row(r) for r in rows]
    for step in steps:
        got = score_batch(completions, targets, RewardConfig(preset="official"), step)
        want = reference.score_rows(completions, rows, step)
        for g, (f, r, p), c in zip(got, want, completions):
            assert (g.format, g.recall, g.precision) == pytest.approx((f, r, p), abs=2e-6), (step, c[:120])
            assert g.total == pytest.approx(g.format + g.recall + g.precision)


def test_policy_like_answers_match_reference():
    rng = random.Random(7)
    rows = [make_row(rng, rng.randint(1, 15)) for _ in range(150)]
    _check([noisy_answer(r, rng) for r in rows], rows)


@pytest.mark.parametrize("text", QUIRKS, ids=range(len(QUIRKS)))
def test_release_quirks_match_reference(text):
    # Alone and inside a batch of regular answers (the fast path must hand irregular answers to the exact one).
    _check([text], [ROW])
    rng = random.Random(1)
    rows = [make_row(rng, 3) for _ in range(5)]
    _check([noisy_answer(r, rng) for r in rows] + [text], rows + [ROW], steps=(None,))


def test_specific_release_values():
    t = target_from_row(ROW)
    cfg = RewardConfig(preset="official")
    empty, obj, three, fallback, noisy_nl = score_batch(
        ["[]", "{}", QUIRKS[5], QUIRKS[14], QUIRKS[17]], [t] * 5, cfg)
    assert (empty.format, empty.recall, obj.format) == (1.0, 0.0, 1.0)  # the loose check passes [] and {}
    assert three.format == 0.0
    assert fallback.parse_status == "fallback" and fallback.n_pred == 1 and fallback.format == 0.0
    assert noisy_nl.format == 0.0 and noisy_nl.recall > 0  # the format regex eats "\n```" first


def test_negative_samples_official_inversion_and_crash_case():
    t = target_from_row(NEG)
    cfg = RewardConfig(preset="official")
    abstain, boxes, garbage = score_batch(["[]", QUIRKS[0], "garbage"], [t] * 3, cfg)
    assert (abstain.format, abstain.recall, abstain.precision) == (0.0, 1.0, 1.0)  # inverted format
    # The release crashes here (torch.cat of no ground truth, then /0); we define 0 for recall and precision.
    assert (boxes.format, boxes.recall, boxes.precision) == (0.0, 0.0, 0.0)
    assert (garbage.format, garbage.recall, garbage.precision) == (1.0, 1.0, 1.0)  # release's inversion
    _check(["[]", QUIRKS[0], "garbage"], [NEG] * 3)
    pa, pb = score_batch(["[]", QUIRKS[0]], [t] * 2, RewardConfig(preset="paper"))
    assert (pa.format, pa.recall, pa.precision) == (1.0, 1.0, 1.0) and pb.total == pytest.approx(1.0)


def test_tp_clamp_quirk_counts_exact_threshold_as_threshold():
    # GIoU exactly 0.5 (pred covers half of the GT, same enclosing box): the (ξ0, ξ0) clamp keeps 0.5, not 1.
    row = dict(ROW, solution=json.dumps([["car", [[0, 0, 100, 100]]]]), num_instances=1, input_width=640,
               input_height=480)
    text = '[{"bbox_2d": [0, 0, 50, 100], "label": "car"}]'
    (off,) = score_batch([text], [target_from_row(row)], RewardConfig(preset="official"))
    (ind,) = score_batch([text], [target_from_row(row)], RewardConfig(preset="official", tp_rule="indicator"))
    assert off.recall == 0.5 and ind.recall == 1.0


def test_bad_ground_truth_names_the_field():
    from megatron_vr1.rewards import RewardInputError
    with pytest.raises(RewardInputError, match="num_instances"):
        target_from_row(dict(ROW, num_instances=3))
    with pytest.raises(RewardInputError, match="target_id_maps"):
        target_from_row(dict(ROW, target_id_maps='{"person": 1}'))
    with pytest.raises(RewardInputError, match="solution"):
        target_from_row(dict(ROW, solution="[[\"car\""))
    with pytest.raises(RewardInputError, match="input_width"):
        target_from_row(dict(ROW, input_width=0))
    with pytest.raises(RewardInputError, match="height"):
        target_from_row({k: v for k, v in ROW.items() if k != "height"})


@pytest.mark.parametrize("truncate,strict", [(True, False), (False, True)])
def test_batch_fast_path_equals_per_completion_parser(truncate, strict):
    # extract_batch converts regular answers with one np.array call; parse_qwen walks every item in Python.
    import numpy as np

    from megatron_vr1.rewards.extract import extract_batch
    from megatron_vr1.rewards.parse_qwen import parse_qwen
    rng = random.Random(5)
    rows = [make_row(rng, 4) for _ in range(20)] + [ROW] * len(QUIRKS)
    texts = [noisy_answer(r, rng) for r in rows[:20]] + QUIRKS
    targets = [target_from_row(r) for r in rows]
    rules = RewardConfig(preset="official", coordinate_cast="truncate" if truncate else "float",
                         format_check="strict" if strict else "loose").rules()
    ex = extract_batch(texts, targets, rules)
    for i, (text, t) in enumerate(zip(texts, targets)):
        one = parse_qwen(text, truncate=truncate, strict=strict, bound_x=t.input_width, bound_y=t.input_height)
        mine = ex.owner == i
        assert ex.boxes[mine].tolist() == [list(map(float, b)) for b in one.boxes], text[:80]
        assert [lb for lb, m in zip(ex.labels, mine) if m] == one.labels
        assert (ex.status[i], bool(ex.format_ok[i])) == (one.status, one.format_ok), text[:80]
    assert np.array_equal(ex.n_parsed, [sum(ex.owner == i) for i in range(len(texts))])
