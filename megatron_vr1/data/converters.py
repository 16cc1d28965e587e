"""COCO / ODinW / RefCOCO annotations -> Vision-R1 rows, with the paper's sample filters.

* COCO detection: one query per image listing every category (paper §3.5, eval protocol §4.1).
* ODinW-style grounding: one query per (image, category present); negatives are (image, absent category).
* RefCOCO REC: one query per referring expression; the label is the expression itself.
Boxes are COCO xywh converted to corners in original-image pixels; crowd annotations are not instances.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_vr1.data import prompts
from megatron_vr1.data.coco import check_category_names, load_coco, xywh_to_xyxy
from megatron_vr1.data.prompts import PromptTemplate
from megatron_vr1.data.schema import RowError, VisionR1Row
from megatron_vr1.types import GroundTruth


@dataclass(frozen=True, slots=True, kw_only=True)
class RowFilter:
    """The paper's selection: instance limits, hard samples (> hard_threshold boxes), negatives, a cap."""

    min_instances: int = 1
    max_instances: int = 30
    """Positive rows outside [min, max] boxes are dropped (the released run keeps 1..30)."""
    hard_threshold: int = 10
    hard_fraction: float | None = None
    """If set, resample positives so this fraction of them is hard (> hard_threshold instances)."""
    negative_ratio: float = 0.0
    """Negative (0-instance) rows kept per positive row, e.g. 0.1; the released Qwen run used none."""
    max_rows: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_instances <= self.max_instances:
            raise ValueError(f"min_instances={self.min_instances} is invalid: use 0 <= min <= max_instances")
        if self.hard_fraction is not None and not 0 <= self.hard_fraction <= 1:
            raise ValueError(f"hard_fraction={self.hard_fraction} is invalid: use a fraction in [0, 1]")
        if self.negative_ratio < 0:
            raise ValueError(f"negative_ratio={self.negative_ratio} is invalid: use >= 0")


def select_rows(rows: list[VisionR1Row], f: RowFilter) -> list[VisionR1Row]:
    """Apply ``f`` deterministically (seeded); the output keeps the input order."""
    rng = np.random.default_rng(f.seed)
    pos = [i for i, r in enumerate(rows) if r.num_instances > 0 and f.min_instances <= r.num_instances <= f.max_instances]
    neg = [i for i, r in enumerate(rows) if r.num_instances == 0]
    if f.hard_fraction is not None and pos:
        hard = [i for i in pos if rows[i].num_instances > f.hard_threshold]
        easy = [i for i in pos if rows[i].num_instances <= f.hard_threshold]
        # the largest set with the requested mix that the pools can supply
        total = len(pos)
        if f.hard_fraction > 0:
            total = min(total, int(len(hard) / f.hard_fraction))
        if f.hard_fraction < 1:
            total = min(total, int(len(easy) / (1 - f.hard_fraction)))
        n_hard = round(total * f.hard_fraction)
        pos = list(rng.choice(hard, n_hard, replace=False)) + list(rng.choice(easy, total - n_hard, replace=False))
    n_neg = min(len(neg), int(round(f.negative_ratio * len(pos))))
    keep = pos + list(rng.choice(neg, n_neg, replace=False)) if n_neg else pos
    if f.max_rows is not None and len(keep) > f.max_rows:
        keep = list(rng.choice(keep, f.max_rows, replace=False))
    return [rows[i] for i in sorted(int(i) for i in keep)]


def _index(data: dict[str, Any], path: Path):
    names = check_category_names(data["categories"], path)
    if any(cid < 1 for cid in names):
        # target_id_maps reserves 0 for "unknown label"; ODinW's raw files carry a background class with id 0
        raise RowError(path, 0, "categories", "a category has id < 1 (id 0 means 'unknown' in target_id_maps); "
                                              "use ODinW's annotations_without_background.json or renumber from 1")
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a.get("bbox"), list) or len(a["bbox"]) != 4 or a.get("category_id") not in names:
            raise RowError(path, k, "annotations", f"annotation {a.get('id')} needs a 4-number bbox and a known "
                                                   f"category_id; fix or remove it")
        if not a.get("iscrowd", 0):
            by_image[a["image_id"]].append(a)
    return names, by_image


def _instances(anns: list[dict[str, Any]], names: dict[int, str], w: int, h: int) -> tuple[GroundTruth, ...]:
    out = []
    for a in sorted(anns, key=lambda a: a.get("id", 0)):
        x1, y1, x2, y2 = xywh_to_xyxy(a["bbox"])
        # COCO boxes can overshoot the border by rounding; clip so rows validate
        box = (max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2))
        out.append(GroundTruth(label=names[a["category_id"]], box=box))
    return tuple(out)


def coco_detection_rows(annotations: str | Path, image_root: str | Path, *, template: PromptTemplate = "qwen25vl",
                        source: str = "coco", row_filter: RowFilter | None = None) -> list[VisionR1Row]:
    """One detection row per image: the prompt lists all categories; the solution has every box."""
    path = Path(annotations)
    data = load_coco(path)
    names, by_image = _index(data, path)
    id_maps = {name: cid for cid, name in names.items()}
    problem = prompts.detection_prompt([names[c] for c in sorted(names)], template)
    rows = []
    for img in data["images"]:
        sol = _instances(by_image.get(img["id"], []), names, img["width"], img["height"])
        rows.append(VisionR1Row(problem=problem, image=Path(image_root) / img["file_name"], solution=sol,
                                width=img["width"], height=img["height"], num_instances=len(sol),
                                target_id_maps=id_maps, source=source))
    return select_rows(rows, row_filter or RowFilter())


def odinw_grounding_rows(annotations: str | Path, image_root: str | Path, *, template: PromptTemplate = "qwen25vl",
                         source: str = "odinw", row_filter: RowFilter | None = None) -> list[VisionR1Row]:
    """One grounding row per (image, category present); negatives are (image, absent category) rows."""
    path = Path(annotations)
    data = load_coco(path)
    names, by_image = _index(data, path)
    id_maps = {name: cid for cid, name in names.items()}
    rows = []
    for img in data["images"]:
        anns = by_image.get(img["id"], [])
        for cid in sorted(names):
            sol = _instances([a for a in anns if a["category_id"] == cid], names, img["width"], img["height"])
            rows.append(VisionR1Row(problem=prompts.grounding_prompt(names[cid], template),
                                    image=Path(image_root) / img["file_name"], solution=sol, width=img["width"],
                                    height=img["height"], num_instances=len(sol), target_id_maps=id_maps,
                                    source=source))
    return select_rows(rows, row_filter or RowFilter())


def refcoco_rows(instances: str | Path, refs: list[dict[str, Any]], image_root: str | Path, *,
                 template: PromptTemplate = "qwen25vl", split: str | None = None, source: str = "refcoco",
                 all_sentences: bool = False) -> list[VisionR1Row]:
    """REC rows from a COCO instances json plus RefCOCO refs (``ann_id``, ``image_id``, ``sentences``,
    ``split``), as the ``refer`` toolkit loads them (converted to JSON). One row per ref (its first
    sentence) or per sentence with ``all_sentences``."""
    path = Path(instances)
    data = load_coco(path)
    anns = {a["id"]: a for a in data["annotations"]}
    images = {img["id"]: img for img in data["images"]}
    rows = []
    for k, ref in enumerate(refs):
        if split is not None and ref.get("split") != split:
            continue
        ann, img = anns.get(ref.get("ann_id")), images.get(ref.get("image_id"))
        sentences = [s.get("sent", s.get("raw", "")) for s in ref.get("sentences", [])]
        if ann is None or img is None or not sentences or not all(isinstance(s, str) and s for s in sentences):
            raise RowError(f"refs[{k}]", k, "ann_id", f"ref {ref.get('ref_id')} points to a missing annotation/"
                                                      f"image or has no sentence; use refs matching {path.name}")
        x1, y1, x2, y2 = xywh_to_xyxy(ann["bbox"])
        box = (max(0.0, x1), max(0.0, y1), min(float(img["width"]), x2), min(float(img["height"]), y2))
        for sent in sentences if all_sentences else sentences[:1]:
            expr = sent.strip()
            rows.append(VisionR1Row(problem=prompts.rec_prompt(expr, template), image=Path(image_root) / img["file_name"],
                                    solution=(GroundTruth(label=expr, box=box),), width=img["width"],
                                    height=img["height"], num_instances=1, target_id_maps={expr.lower(): 1},
                                    source=source))
    return rows
