"""RewardTarget: the ground truth of one query in the form the scorer needs, validated once and cached.

Built from a ``types.Sample`` (training) or from a dataset-style row (``megatron-vr1 score``), whose
``solution`` is a JSON list of ``[label, [[x1, y1, x2, y2], ...]]`` in original-image pixels and whose
``target_id_maps`` is a JSON object label -> id >= 1 (id 0 means "unknown label").
"""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from megatron_vr1.types import Sample

MAX_GT_BOXES = 4096
"""Cap on ground-truth boxes per target (the released data keeps 1-30)."""
_SHARED_MAPS: dict[tuple, dict[str, int]] = {}
"""Equal id maps of different targets, one dict object: the scorer tells maps apart by identity."""
_SHARED_MAPS_CAP = 4096


class RewardInputError(ValueError):
    """A ground-truth field is malformed. ``field`` names it; the message says what to do."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"field {field_name!r}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RewardTarget:
    """Ground truth of one query. Boxes are (x1, y1, x2, y2) in original-image pixels."""

    gt_boxes: np.ndarray
    """[G, 4] float64, original-image pixels."""
    gt_class_ids: np.ndarray
    """[G] int64 ids from target_id_maps (>= 1)."""
    width: int
    height: int
    input_width: int
    input_height: int
    num_instances: int
    target_id_maps: Mapping[str, int]
    """Lower-cased label -> id (the released code lower-cases the keys)."""
    gt_labels: tuple[str, ...] = field(default=())
    meta: bytes = bytes(48)
    """(width, height, input_width, input_height, n_gt, num_instances) as 6 packed float64: a batch's
    [B, 6] array is one bytes join, no per-number conversion."""
    gt_rows: np.ndarray | None = None
    """[G, 5] float64: the boxes and the class id, built once so that a batch pads one array per side."""

    @property
    def n_gt(self) -> int:
        return int(self.gt_boxes.shape[0])


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RewardInputError(name, f"expected a positive integer, got {value!r}")
    return value


def make_target(*, solution: list | tuple, width: Any, height: Any, input_width: Any, input_height: Any,
                num_instances: Any, target_id_maps: Mapping[str, Any]) -> RewardTarget:
    """Validate and build a RewardTarget; raises RewardInputError naming the bad field."""
    width, height = _positive_int(width, "width"), _positive_int(height, "height")
    input_width = _positive_int(input_width, "input_width")
    input_height = _positive_int(input_height, "input_height")
    if isinstance(num_instances, bool) or not isinstance(num_instances, int) or num_instances < 0:
        raise RewardInputError("num_instances", f"expected an integer >= 0, got {num_instances!r}")
    if not isinstance(target_id_maps, Mapping):
        raise RewardInputError("target_id_maps", "expected a JSON object mapping label -> id >= 1")
    id_map: dict[str, int] = {}
    for key, value in target_id_maps.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RewardInputError("target_id_maps", f"entry {key!r}: {value!r} must map a label to an id >= 1 "
                                   "(id 0 is reserved for unknown labels)")
        id_map[key.lower()] = value
    if not isinstance(solution, (list, tuple)):
        raise RewardInputError("solution", "expected a list of [label, [[x1, y1, x2, y2], ...]]")
    labels: list[str] = []
    boxes: list[tuple[float, float, float, float]] = []
    for i, item in enumerate(solution):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise RewardInputError("solution", f"item {i}: expected [label, [[x1, y1, x2, y2]]], got {item!r:.80}")
        label, item_boxes = item
        if label.lower() not in id_map:
            raise RewardInputError("target_id_maps", f"has no id for ground-truth label {label!r} (item {i})")
        if item_boxes and isinstance(item_boxes[0], (int, float)):
            item_boxes = [item_boxes]  # a bare [x1, y1, x2, y2]: the released code's .view(-1, 4) accepts it
        for box in item_boxes:
            ok = (isinstance(box, (list, tuple)) and len(box) == 4
                  and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in box))
            if not ok or not (box[0] <= box[2] and box[1] <= box[3]):
                raise RewardInputError("solution", f"item {i}: box {box!r:.80} must be 4 finite numbers "
                                       "x1 <= x2, y1 <= y2 in original-image pixels")
            labels.append(label)
            boxes.append(tuple(float(c) for c in box))
    if len(boxes) > MAX_GT_BOXES:
        raise RewardInputError("solution", f"{len(boxes)} boxes exceed the cap of {MAX_GT_BOXES}")
    if num_instances != len(boxes):
        raise RewardInputError("num_instances", f"is {num_instances} but solution has {len(boxes)} boxes; "
                               "they must agree (recall divides by num_instances)")
    gt = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ids = np.asarray([id_map[lb.lower()] for lb in labels], dtype=np.int64)
    id_map = _shared(id_map)
    return RewardTarget(gt_boxes=gt, gt_class_ids=ids, width=width, height=height, input_width=input_width,
                        input_height=input_height, num_instances=num_instances, target_id_maps=id_map,
                        gt_labels=tuple(labels), gt_rows=np.column_stack((gt, ids.astype(np.float64))),
                        meta=array("d", (width, height, input_width, input_height, len(boxes), num_instances)).tobytes())


def _shared(id_map: dict[str, int]) -> dict[str, int]:
    """The one shared dict equal to ``id_map`` (same items, same order). Never mutated after this."""
    if len(_SHARED_MAPS) >= _SHARED_MAPS_CAP:
        _SHARED_MAPS.clear()  # bounded: a dataset with ever new maps only loses the sharing
    return _SHARED_MAPS.setdefault(tuple(id_map.items()), id_map)


def target_from_sample(sample: Sample) -> RewardTarget:
    """RewardTarget of a training Sample (solution already typed as GroundTruth records)."""
    return make_target(solution=[[g.label, [list(g.box)]] for g in sample.solution], width=sample.width,
                       height=sample.height, input_width=sample.input_width, input_height=sample.input_height,
                       num_instances=sample.num_instances, target_id_maps=sample.target_id_maps)


def _json_field(row: Mapping[str, Any], name: str) -> Any:
    raw = row[name]
    if not isinstance(raw, str):
        return raw  # already decoded (a list / dict) is accepted too
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise RewardInputError(name, f"is not valid JSON ({e})") from None


def target_from_row(row: Mapping[str, Any]) -> RewardTarget:
    """RewardTarget of a dataset row (Vision-R1 columns; solution and target_id_maps are JSON strings)."""
    required = ("solution", "width", "height", "input_width", "input_height", "target_id_maps", "num_instances")
    for name in required:
        if name not in row:
            raise RewardInputError(name, "is missing")
    return make_target(solution=_json_field(row, "solution"), width=row["width"], height=row["height"],
                       input_width=row["input_width"], input_height=row["input_height"],
                       num_instances=row["num_instances"], target_id_maps=_json_field(row, "target_id_maps"))
