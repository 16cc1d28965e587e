"""Where detection quality goes, beside COCO AP: box overlap and labels of one-to-one matched boxes.

COCO AP mixes three things: finding the objects, placing the boxes, and naming them. These statistics separate
them. In each image, predictions are matched one-to-one to ground-truth boxes by IoU (Hungarian, labels
ignored); over all matched pairs they report the mean IoU, the share at IoU >= 0.5 / 0.75 / 0.9 and the share
whose label is right, plus how many images got the object count right. The demo uses them to say what a
training stage changed (e.g. tighter boxes while the labels stayed as they were).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4], both COCO [x, y, w, h]."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def localization_stats(gt: dict[str, Any], dets: list[dict[str, Any]]) -> dict[str, float]:
    """Matched-box statistics of COCO ``dets`` against the COCO ground truth ``gt`` (see the module docstring).

    Images without ground truth are left out; the shares are over matched pairs (``n_matched``), and
    ``count_acc`` is over images with ground truth."""
    gt_by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in gt.get("annotations", []):
        gt_by_image[int(ann["image_id"])].append(ann)
    dt_by_image: dict[int, list[dict]] = defaultdict(list)
    for det in dets:
        dt_by_image[int(det["image_id"])].append(det)
    ious: list[float] = []
    label_ok: list[bool] = []
    count_ok = 0
    for image_id, anns in gt_by_image.items():
        preds = dt_by_image.get(image_id, [])
        count_ok += len(preds) == len(anns)
        if not preds:
            continue
        overlap = iou_matrix(np.array([p["bbox"] for p in preds], float), np.array([g["bbox"] for g in anns], float))
        rows, cols = linear_sum_assignment(-overlap)
        for i, j in zip(rows, cols):
            ious.append(float(overlap[i, j]))
            label_ok.append(int(preds[i]["category_id"]) == int(anns[j]["category_id"]))
    matched = np.array(ious)
    n = len(matched)
    share = (lambda mask: float(mask.mean()) if n else 0.0)
    return {"mean_iou": float(matched.mean()) if n else 0.0, "iou_ge_50": share(matched >= 0.5),
            "iou_ge_75": share(matched >= 0.75), "iou_ge_90": share(matched >= 0.9),
            "label_acc": share(np.array(label_ok)), "count_acc": count_ok / max(1, len(gt_by_image)),
            "n_matched": float(n), "n_gt": float(sum(len(v) for v in gt_by_image.values())),
            "n_det": float(len(dets))}
