"""COCO bbox metrics through faster-coco-eval, with input validation that names the bad row and field.

The twelve summary numbers are exactly pycocotools' ``COCOeval.stats`` (IoU 0.50:0.95, maxDets 1/10/100, area
ranges small/medium/large), in [0, 1]; -1 means "no ground truth in that bucket", as pycocotools reports it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAT_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""Names of pycocotools' ``COCOeval.stats`` entries, in its order."""

MAX_JSON_BYTES = 2 * 1024**3
"""Refuse annotation/detection files above 2 GiB (COCO val2017 GT is 25 MB; LVIS val 200 MB)."""


class CocoInputError(ValueError):
    """A ground-truth or detection input is malformed. The message names the file, the row and the field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CocoMetrics:
    """Summary statistics plus what the figures need (precision at each recall threshold)."""

    stats: dict[str, float]
    """STAT_KEYS -> value (0-1, or -1 when there is no ground truth for that bucket)."""
    per_category: list[dict[str, Any]]
    """One row per GT category: id, name, AP, AP50, AP75, n_gt, n_det (AP -1 when the category has no GT)."""
    recall_thresholds: list[float] = field(default_factory=list)
    precision_at_iou: dict[str, list[float]] = field(default_factory=dict)
    """"0.50"/"0.75"/"0.50:0.95" -> category-averaged precision per recall threshold (area all, maxDets 100)."""
    n_images: int = 0
    n_detections: int = 0

    def to_json(self) -> dict[str, Any]:
        """The metrics.json payload: the twelve stats at top level plus the per-category table."""
        return {**self.stats, "per_category": self.per_category, "n_images": self.n_images,
                "n_detections": self.n_detections}


def load_json_file(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file, turning missing/oversized/invalid files into a CocoInputError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise CocoInputError(f"{what} file {p} does not exist; pass the path of a COCO-format JSON file.")
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CocoInputError(f"{what} file {p} is {size / 1e9:.1f} GB, above the {MAX_JSON_BYTES / 1e9:.1f} GB cap.")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoInputError(f"{what} file {p} is not valid JSON: {e}") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_bbox(bbox: Any, where: str) -> None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise CocoInputError(f"{where}: field 'bbox' must be [x, y, width, height] (4 finite numbers), got {bbox!r}.")
    if bbox[2] < 0 or bbox[3] < 0:
        raise CocoInputError(f"{where}: field 'bbox' has a negative width or height ({bbox!r}); COCO boxes are "
                             "[x, y, width, height], not corners.")


def validate_ground_truth(gt: Any, source: str = "ground truth") -> dict[str, Any]:
    """Check a COCO ground-truth dict and return a normalised copy.

    Missing ``area`` is filled with ``w*h`` and missing ``iscrowd`` with 0 (pycocotools needs both); annotation
    ids are filled when absent. Raises CocoInputError naming ``source``, the list, the row index and the field.
    """
    if not isinstance(gt, dict):
        raise CocoInputError(f"{source}: top level must be an object with 'images', 'annotations' and "
                             f"'categories', got {type(gt).__name__}.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise CocoInputError(f"{source}: missing or non-list field '{key}'; a COCO ground truth needs "
                                 "'images', 'annotations' and 'categories' lists.")
    images, cats = [], []
    for i, img in enumerate(gt["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            raise CocoInputError(f"{source}: images[{i}]: field 'id' must be an integer.")
        images.append(dict(img))
    for i, cat in enumerate(gt["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise CocoInputError(f"{source}: categories[{i}]: needs an integer 'id' and a string 'name'.")
        cats.append(dict(cat))
    image_ids = {img["id"] for img in images}
    cat_ids = {c["id"] for c in cats}
    anns = []
    for i, ann in enumerate(gt["annotations"]):
        where = f"{source}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise CocoInputError(f"{where}: must be an object, got {type(ann).__name__}.")
        if ann.get("image_id") not in image_ids:
            raise CocoInputError(f"{where}: field 'image_id'={ann.get('image_id')!r} is not an id in 'images'.")
        if ann.get("category_id") not in cat_ids:
            raise CocoInputError(f"{where}: field 'category_id'={ann.get('category_id')!r} is not an id in "
                                 "'categories'.")
        _check_bbox(ann.get("bbox"), where)
        a = dict(ann)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        a.setdefault("iscrowd", 0)
        a.setdefault("id", i + 1)
        anns.append(a)
    return {**gt, "images": images, "annotations": anns, "categories": cats}


def validate_detections(dets: Any, gt: dict[str, Any], source: str = "detections") -> list[dict[str, Any]]:
    """Check a COCO results list (image_id, category_id, bbox [x,y,w,h], score) against a validated GT."""
    if isinstance(dets, dict) and isinstance(dets.get("annotations"), list):
        dets = dets["annotations"]  # a full COCO dict of predictions is accepted too
    if not isinstance(dets, list):
        raise CocoInputError(f"{source}: top level must be a list of detections "
                             f"{{image_id, category_id, bbox, score}}, got {type(dets).__name__}.")
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    out = []
    for i, d in enumerate(dets):
        where = f"{source}: row {i}"
        if not isinstance(d, dict):
            raise CocoInputError(f"{where}: must be an object, got {type(d).__name__}.")
        if d.get("image_id") not in image_ids:
            raise CocoInputError(f"{where}: field 'image_id'={d.get('image_id')!r} is not an image of the ground "
                                 "truth; evaluate against the GT file the detections were made for.")
        if d.get("category_id") not in cat_ids:
            raise CocoInputError(f"{where}: field 'category_id'={d.get('category_id')!r} is not a category of the "
                                 "ground truth.")
        _check_bbox(d.get("bbox"), where)
        if not _is_number(d.get("score")):
            raise CocoInputError(f"{where}: field 'score' must be a finite number, got {d.get('score')!r}.")
        out.append({"image_id": d["image_id"], "category_id": d["category_id"],
                    "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])})
    return out


def _silent(*_args: Any, **_kwargs: Any) -> None:
    return None


def _mean_valid(values: Any) -> float:
    """Mean of the entries > -1 (pycocotools' convention for "undefined"), or -1 if none."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    v = v[v > -1]
    return float(v.mean()) if v.size else -1.0


def coco_metrics(gt: dict[str, Any], dets: list[dict[str, Any]]) -> CocoMetrics:
    """COCO bbox evaluation of validated inputs with faster-coco-eval (pycocotools-identical numbers)."""
    import numpy as np
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt, print_function=_silent)
    # loadRes mutates its input rows (adds id/area/segmentation): give it copies.
    coco_dt = coco_gt.loadRes([dict(d) for d in dets])
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_silent)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = {k: float(v) for k, v in zip(STAT_KEYS, ev.stats[: len(STAT_KEYS)])}

    precision = np.asarray(ev.eval["precision"])  # [T iou, R recall, K cat, A area, M maxdets]
    iou_thrs = np.asarray(ev.params.iouThrs)
    cat_ids = list(ev.params.catIds)
    t50, t75 = int(np.argmin(abs(iou_thrs - 0.5))), int(np.argmin(abs(iou_thrs - 0.75)))
    n_gt = {c: 0 for c in cat_ids}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            n_gt[a["category_id"]] += 1
    n_det = {c: 0 for c in cat_ids}
    for d in dets:
        n_det[d["category_id"]] += 1
    names = {c["id"]: c["name"] for c in gt["categories"]}
    per_category = []
    for k, cid in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        per_category.append({"id": int(cid), "name": names[cid], "AP": _mean_valid(p), "AP50": _mean_valid(p[t50]),
                             "AP75": _mean_valid(p[t75]), "n_gt": n_gt[cid], "n_det": n_det[cid]})

    def curve(p: Any) -> list[float]:  # p: [R, K] -> category-mean per recall threshold (undefined -> 0)
        return [max(_mean_valid(row), 0.0) for row in p]

    curves = {"0.50": curve(precision[t50, :, :, 0, -1]), "0.75": curve(precision[t75, :, :, 0, -1]),
              "0.50:0.95": curve(precision[:, :, :, 0, -1].mean(axis=0))}
    return CocoMetrics(stats=stats, per_category=per_category, recall_thresholds=[float(r) for r in ev.params.recThrs],
                       precision_at_iou=curves, n_images=len(gt["images"]), n_detections=len(dets))


def evaluate_files(gt_path: str | os.PathLike, dt_path: str | os.PathLike) -> CocoMetrics:
    """Load, validate and evaluate a GT file and a detections file (errors name the file, row and field)."""
    gt = validate_ground_truth(load_json_file(gt_path, "ground-truth"), source=str(gt_path))
    dets = validate_detections(load_json_file(dt_path, "detections"), gt, source=str(dt_path))
    return coco_metrics(gt, dets)
