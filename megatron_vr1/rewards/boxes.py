"""Batched pairwise box geometry on padded arrays: IoU, GIoU and L1 distance.

Boxes are (x1, y1, x2, y2) corners, float64. ``pred`` is [B, P, 4] and ``gt`` is [B, G, 4]; the result is
[B, P, G]. Padding rows are allowed: callers mask them. Degenerate pairs (zero union) get overlap 0 rather
than NaN so padding never poisons a reduction.
"""

from __future__ import annotations

import numpy as np


def _split(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def pairwise_iou_giou(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and GIoU (DETR's definitions) of every (pred, gt) pair: two [B, P, G] arrays."""
    px1, py1, px2, py2 = (a[:, :, None] for a in _split(pred))
    gx1, gy1, gx2, gy2 = (a[:, None, :] for a in _split(gt))
    area_p = (px2 - px1) * (py2 - py1)
    area_g = (gx2 - gx1) * (gy2 - gy1)
    # In-place ops on [B, P, G] buffers: numpy's per-call overhead dominates at these sizes.
    inter = np.minimum(px2, gx2)
    inter -= np.maximum(px1, gx1)
    np.maximum(inter, 0.0, out=inter)
    ih = np.minimum(py2, gy2)
    ih -= np.maximum(py1, gy1)
    np.maximum(ih, 0.0, out=ih)
    inter *= ih
    union = area_p + area_g
    union -= inter
    enclose = np.maximum(px2, gx2)
    enclose -= np.minimum(px1, gx1)
    eh = np.maximum(py2, gy2)
    eh -= np.minimum(py1, gy1)
    enclose *= eh
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        # giou = iou - (enclose - union) / enclose
        gap = enclose - union
        np.divide(gap, enclose, out=gap, where=enclose > 0)
        gap[enclose <= 0] = 0.0
        giou = iou - gap
    return iou, giou


def pairwise_l1(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Sum of absolute coordinate differences of every pair (torch.cdist(p=1)): [B, P, G]."""
    # One coordinate at a time on [B, P, G] (in place) instead of a [B, P, G, 4] temporary.
    out = np.abs(pred[:, :, None, 0] - gt[:, None, :, 0])
    tmp = np.empty_like(out)
    for k in (1, 2, 3):
        np.subtract(pred[:, :, None, k], gt[:, None, :, k], out=tmp)
        np.abs(tmp, out=tmp)
        out += tmp
    return out
