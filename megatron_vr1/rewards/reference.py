"""A plain per-completion re-implementation of the released reward (Vision-R1/vision_r1/visionr1_qwen.py).

It mirrors the release's structure on purpose: three independent reward functions, each re-parsing every
completion in a Python loop, a DETR cost matrix and ``linear_sum_assignment`` per completion, float32 like
the release's torch tensors (numpy stands in for torch). It is the oracle the batched scorer is tested
against and the baseline of ``megatron-vr1 bench reward``. Official preset only; not used in training.

Where the release crashes (a negative sample with predicted boxes) it returns the value ``score.py``
defines (recall = precision = 0).
"""

from __future__ import annotations

import json
import re

import numpy as np
from scipy.optimize import linear_sum_assignment

from megatron_vr1.rewards.parse_qwen import FALLBACK_RE

_SWITCH = 1500


def _parse_json(stripped: str):
    try:
        lines = stripped.strip().splitlines()
        if lines[0].startswith("```json"):
            stripped = "\n".join(lines[1:])
        if "```" in stripped:
            stripped = stripped.split("```")[0]
        return json.loads(stripped)
    except Exception:  # the release returns None on any failure
        return None


def extract(completion: str) -> list[dict]:
    """The released ``extract``: JSON list items, else the exact-spelling regex fallback."""
    output = []
    extracted = _parse_json(completion)
    if isinstance(extracted, list):
        for item in extracted:
            try:
                category_name = item.get("label")
                bbox = item.get("bbox_2d")
                if isinstance(bbox, list) and len(bbox) == 4:
                    bbox = [int(coord) for coord in bbox]
                    if bbox[0] < bbox[2] and bbox[1] < bbox[3]:
                        output.append({"bbox": bbox, "category_name": category_name})
            except Exception:
                continue
    if not output:
        for x1, y1, x2, y2, label in FALLBACK_RE.findall(completion):
            bbox = [int(x1), int(y1), int(x2), int(y2)]
            if bbox[0] < bbox[2] and bbox[1] < bbox[3]:
                output.append({"bbox": bbox, "category_name": label})
    return output


def _giou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union
    lt = np.minimum(a[:, None, :2], b[None, :, :2])
    rb = np.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def _matched_giou(completion: str, solution: list, width, height, id_map: dict, in_w, in_h) -> np.ndarray | None:
    """BoxPriorMatcher on one completion: GIoU of the matched pairs, or None when nothing was parsed."""
    dt = extract(completion)
    if not dt:
        return None
    id_map = {k.lower(): v for k, v in id_map.items()}
    cls_ids, boxes = [], []
    for item in dt:
        try:
            cls_ids.append(id_map[item["category_name"].strip().lower()])
        except Exception:
            cls_ids.append(0)
        box = np.asarray(item["bbox"], dtype=np.float32)
        box[0::2] = box[0::2] / np.float32(in_w) * np.float32(width)
        box[1::2] = box[1::2] / np.float32(in_h) * np.float32(height)
        boxes.append(box)
    pred = np.stack(boxes)
    onehot = np.zeros((len(pred), max(id_map.values()) + 1), dtype=np.float32)
    onehot[np.arange(len(pred)), cls_ids] = 1.0
    gt = np.asarray([b for _, bs in solution for b in bs], dtype=np.float32).reshape(-1, 4)
    gt_ids = [id_map[label.lower()] for label, bs in solution for _ in bs]
    giou = _giou(pred, gt)
    cost = np.abs(pred[:, None, :] - gt[None, :, :]).sum(-1) - onehot[:, gt_ids] - giou
    rows, cols = linear_sum_assignment(cost)
    return giou[rows, cols]


def _clamp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    x = x.astype(np.float32).copy()
    x[x < lo] = 0
    x[x > hi] = 1
    return x


def dual_format_reward(completion: str, num_instance: int) -> float:
    """The released format check, inverted on negative samples."""
    text = re.sub(r"```json\n|\n```", "", completion).strip()
    reward = 1.0
    try:
        data = json.loads(text)
        if isinstance(data, list):
            for item in data:
                if isinstance(item, dict) and "bbox_2d" in item and "label" in item:
                    bbox = item["bbox_2d"]
                    if not (isinstance(bbox, list) and len(bbox) == 4):
                        reward = 0.0
    except (json.JSONDecodeError, RecursionError):
        reward = 0.0
    return reward if num_instance > 0 else 1.0 - reward


def recall_reward(completion: str, row: dict, step: int | None) -> float:
    """The released recall_reward for one completion."""
    lo, hi = (0.5, 0.75) if step is not None else (0.0, 1.0)
    tp_thr = 0.5 if step is None or step < _SWITCH else 0.75
    giou = _matched_giou(completion.strip(), *_row_args(row))
    if giou is None:
        return 0.0 if row["num_instances"] > 0 else 1.0
    if row["num_instances"] == 0:
        return 0.0  # the release crashes here; see score.py
    recall = float(_clamp(giou, tp_thr, tp_thr).sum()) / row["num_instances"]
    return 0.0 if recall < lo else 1.0 if recall > hi else recall


def precision_reward(completion: str, row: dict, step: int | None) -> float:
    """The released precision_reward for one completion."""
    if step is None:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = (0.5, 0.75) if step < _SWITCH else (0.75, 0.9)
    giou = _matched_giou(completion.strip(), *_row_args(row))
    if giou is None:
        return 0.0 if row["num_instances"] > 0 else 1.0
    if row["num_instances"] == 0:
        return 0.0
    return float(np.mean(_clamp(giou, lo, hi)))


def _row_args(row: dict) -> tuple:
    return (json.loads(row["solution"]), row["width"], row["height"], json.loads(row["target_id_maps"]),
            row["input_width"], row["input_height"])


def score_rows(completions: list[str], rows: list[dict], step: int | None) -> list[tuple[float, float, float]]:
    """(format, recall, precision) per completion, the way the released trainer calls the three functions."""
    fmt = [dual_format_reward(c, r["num_instances"]) for c, r in zip(completions, rows)]
    rec = [recall_reward(c, r, step) for c, r in zip(completions, rows)]
    prec = [precision_reward(c, r, step) for c, r in zip(completions, rows)]
    return list(zip(fmt, rec, prec))
