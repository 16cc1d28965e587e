"""Matched-box statistics (IoU, labels, counts) against hand-computed cases and the demo's diagnostics."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_vr1.eval.localization import iou_matrix, localization_stats


def _gt():
    return {"images": [{"id": 1}, {"id": 2}, {"id": 3}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10]},
                            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 4]},
                            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [5, 5, 10, 10]}]}


def test_iou_matrix_hand_values():
    a = np.array([[0, 0, 10, 10], [5, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [100, 100, 1, 1]], float)
    want = [[1.0, 0.5, 0.0], [50 / 150, 25 / 125, 0.0]]
    assert iou_matrix(a, b) == pytest.approx(np.array(want))


def test_stats_match_by_iou_not_by_label_or_order():
    dets = [  # image 1: listed in the other order, the second with the wrong label, shifted by 5 px (IoU 1/3)
        {"image_id": 1, "category_id": 1, "bbox": [25, 20, 10, 10], "score": 0.99},
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.99},
        # image 2: right label, half the box (IoU 0.5), plus a spurious second box
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 2], "score": 0.99},
        {"image_id": 2, "category_id": 3, "bbox": [40, 40, 4, 4], "score": 0.99},
        # image 3: nothing predicted
    ]
    s = localization_stats(_gt(), dets)
    ious = [1.0, 1 / 3, 0.5]
    assert s["n_matched"] == 3 and s["n_gt"] == 4 and s["n_det"] == 4
    assert s["mean_iou"] == pytest.approx(np.mean(ious))
    assert (s["iou_ge_50"], s["iou_ge_75"], s["iou_ge_90"]) == pytest.approx((2 / 3, 1 / 3, 1 / 3))
    assert s["label_acc"] == pytest.approx(2 / 3)  # image 1's shifted box carries label 1 against GT label 2
    assert s["count_acc"] == pytest.approx(1 / 3)  # only image 1 has as many boxes as objects


def test_no_detections_gives_zeros_not_nan():
    s = localization_stats(_gt(), [])
    assert s["n_matched"] == 0 and s["mean_iou"] == 0.0 and s["label_acc"] == 0.0 and s["count_acc"] == 0.0
