"""Output formats and coordinate conventions: Griffon-G text, 0-1000 normalised Qwen2-VL, strict format."""

import json

import pytest

from megatron_vr1.config.reward import RewardConfig
from megatron_vr1.rewards import score_batch, target_from_row
from megatron_vr1.rewards.boxes import pairwise_iou_giou

ROW = dict(solution=json.dumps([["person", [[64, 48, 320, 240]]], ["car", [[320, 240, 640, 480]]]]), width=640,
           height=480, input_width=644, input_height=476, target_id_maps='{"person": 1, "car": 2}', num_instances=2)


def test_griffon_text_parses_normalised_boxes():
    cfg = RewardConfig(preset="paper", output_format="griffon_text")
    good = "person-[0.100,0.100,0.500,0.500] & car-[0.500,0.500,1.000,1.000]"
    out = score_batch([good, "person-[0.1,0.1,0.5,0.5]", "car-[0.500,0.500,1.200,1.000]", ""],
                      [target_from_row(ROW)] * 4, cfg)
    assert (out[0].format, out[0].recall, out[0].precision) == (1.0, 1.0, 1.0)
    assert out[1].n_pred == 0 and out[1].format == 0.0  # 3 decimals required
    assert out[2].format == 0.0 and out[2].n_pred == 1  # content check: coordinate above 1


def test_normalised_1000_coordinates():
    cfg = RewardConfig(preset="official", coordinates="normalized_1000")
    text = '[{"bbox_2d": [100, 100, 500, 500], "label": "person"}, {"bbox_2d": [500, 500, 1000, 1000], "label": "car"}]'
    (out,) = score_batch([text], [target_from_row(ROW)], cfg)
    assert out.recall == 1.0 and out.precision == pytest.approx(1.0)


def test_strict_format_checks_template_and_bounds():
    cfg = RewardConfig(preset="paper")
    t = target_from_row(ROW)
    texts = ['```json\n[{"bbox_2d": [64, 47, 322, 238], "label": "person"}]\n```',
             '[{"bbox_2d": [64, 47, 322, 238], "label": "person"}]',
             '[{"bbox_2d": [64, 47, 999, 238], "label": "person"}]',      # beyond input width 644
             '[{"bbox_2d": [64, 47, 322, 238], "label": "person", "score": 1}]',
             '[{"bbox_2d": ["64", 47, 322, 238], "label": "person"}]',
             'Sure! ```json\n[]\n```', '{}', '[]']
    fmts = [o.format for o in score_batch(texts, [t] * len(texts), cfg)]
    assert fmts == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_iou_and_giou_values():
    import numpy as np
    pred = np.array([[[0, 0, 10, 10], [20, 20, 30, 30]]], dtype=float)
    gt = np.array([[[5, 0, 15, 10]]], dtype=float)
    iou, giou = pairwise_iou_giou(pred, gt)
    assert iou[0, 0, 0] == pytest.approx(50 / 150) and giou[0, 0, 0] == pytest.approx(50 / 150)
    assert iou[0, 1, 0] == 0.0 and giou[0, 1, 0] == pytest.approx(0 - (25 * 30 - 200) / (25 * 30))


def test_paper_uses_iou_and_all_predictions():
    t = target_from_row(ROW)
    text = ('[{"bbox_2d": [64, 47, 322, 238], "label": "person"}, {"bbox_2d": [322, 238, 644, 476], '
            '"label": "car"}, {"bbox_2d": [0, 0, 10, 10], "label": "car"}]')
    off, = score_batch([text], [t], RewardConfig(preset="official"), 0)
    pap, = score_batch([text], [t], RewardConfig(preset="paper"), None)
    assert off.precision == 1.0  # the extra box is free under the released reward
    assert pap.precision == pytest.approx(2 / 3)
