"""Batched pairwise box geometry: IoU, GIoU and L1 distance.

Boxes are (x1, y1, x2, y2) corners, float64. The core functions ``iou_giou`` and ``l1`` take the four
coordinates of each side as arrays that broadcast against each other, so one implementation serves:

* ``pairwise_*``: padded ``pred`` [B, P, 4] and ``gt`` [B, G, 4] -> [B, P, G];
* the scorer's flat pair lists: coordinates [N] of both boxes of each of N (pred, gt) pairs -> [N]. On
  contiguous 1-D arrays every numpy op runs at full speed; broadcasting a short inner axis (G or B) costs
  2-3x more per element at these sizes.

Padding rows are allowed: callers mask them. Degenerate pairs (zero union) get overlap 0 rather than NaN
so padding never poisons a reduction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Coords = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def iou_giou(p: Sequence[np.ndarray], g: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """IoU and GIoU (DETR's definitions) of the broadcast pairs of boxes with coordinates ``p`` and ``g``
    (x1, y1, x2, y2 and optionally the area (x2 - x1) * (y2 - y1), precomputed)."""
    px1, py1, px2, py2 = p[:4]
    gx1, gy1, gx2, gy2 = g[:4]
    # A fifth coordinate, when given, is the box area computed once per box (not once per pair).
    area_p = p[4] if len(p) > 4 else (px2 - px1) * (py2 - py1)
    area_g = g[4] if len(g) > 4 else (gx2 - gx1) * (gy2 - gy1)
    # In-place ops on pairwise buffers: numpy's per-call overhead dominates at these sizes.
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
    # giou = iou - (enclose - union) / enclose. Real boxes have positive areas, so the plain divisions
    # are the usual case; the masked ones give 0 for degenerate pairs (and padding).
    gap = enclose - union
    if (union > 0).all():
        iou = inter / union
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    if (enclose > 0).all():
        gap /= enclose
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(gap, enclose, out=gap, where=enclose > 0)
        gap[enclose <= 0] = 0.0
    giou = iou - gap
    return iou, giou


def l1(p: Sequence[np.ndarray], g: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of absolute coordinate differences of the broadcast pairs (torch.cdist(p=1)), summed x1..y2."""
    # One coordinate at a time (in place) instead of a 4-wide temporary.
    out = np.abs(p[0] - g[0])
    tmp = np.empty_like(out)
    for k in (1, 2, 3):
        np.subtract(p[k], g[k], out=tmp)
        np.abs(tmp, out=tmp)
        out += tmp
    return out


def _bpg(pred: np.ndarray, gt: np.ndarray) -> tuple[Coords, Coords]:
    p = tuple(pred[:, :, None, k] for k in range(4))
    g = tuple(gt[:, None, :, k] for k in range(4))
    return p, g  # type: ignore[return-value]


def pairwise_iou_giou(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and GIoU of every (pred, gt) pair: ``pred`` [B, P, 4], ``gt`` [B, G, 4] -> two [B, P, G]."""
    return iou_giou(*_bpg(pred, gt))


def pairwise_l1(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """L1 distance of every (pred, gt) pair: ``pred`` [B, P, 4], ``gt`` [B, G, 4] -> [B, P, G]."""
    return l1(*_bpg(pred, gt))
