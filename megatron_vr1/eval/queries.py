"""Evaluation queries by the paper's protocol (spec §4.1), built from a COCO ground truth plus image rows.

* COCO mode: one query per image listing every category of the ground truth.
* Grounding mode (ODinW, the released ``--single --pos``): one query per (image, category present in its GT).

Images come either from a directory (the GT's ``file_name`` under it) or from data rows (JSONL / JSON list /
parquet) that carry ``image`` and either ``image_id`` or a basename equal to the GT ``file_name``'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_vr1.data.image import smart_resize  # one implementation for training, rollout and evaluation

COCO_PROMPT = ("Locate every item from the category list in the image and output the coordinates in JSON format. "
               "The category set includes {categories}.")
GROUNDING_PROMPT = "Locate every {category} in the image and output the coordinates in JSON format."
EVAL_MIN_PIXELS = 28 * 28
EVAL_MAX_PIXELS = 12800 * 28 * 28
"""The released eval's processor limits (larger than training's 401408)."""
MAX_ROWS_BYTES = 4 * 1024**3


class EvalDataError(ValueError):
    """Bad evaluation data: the message names the file, the row and the field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalQuery:
    """One prompt to the model and what is needed to turn its answer into COCO detections."""

    query_id: str
    dataset: str
    image_id: int
    image: str
    problem: str
    """The user text (the chat template is applied by the caller)."""
    width: int
    height: int
    input_width: int
    input_height: int
    categories: tuple[str, ...]
    """Category names asked for in this query."""


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows from a .jsonl, a .json list or a .parquet file (errors name the file and line)."""
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"data file {p} does not exist; pass rows (.jsonl/.json/.parquet) or an image directory.")
    if p.stat().st_size > MAX_ROWS_BYTES:
        raise EvalDataError(f"data file {p} is larger than the {MAX_ROWS_BYTES >> 30} GiB cap.")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file; all are user errors here
            raise EvalDataError(f"data file {p} is not a readable parquet file: {e}") from None
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"data file {p} is not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise EvalDataError(f"data file {p}: a .json data file must hold a list of rows.")
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalDataError(f"data file {p}, line {n}: not valid JSON ({e}).") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EvalDataError(f"data file {p}, row {i}: must be an object, got {type(row).__name__}.")
    return rows


def _image_index(gt: dict[str, Any], data: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """GT image id -> {image (path), input_width, input_height (optional)} from a directory or rows."""
    d = Path(data)
    by_id: dict[int, dict[str, Any]] = {}
    if d.is_dir():
        for img in gt["images"]:
            if not isinstance(img.get("file_name"), str):
                raise EvalDataError(f"ground truth image id {img['id']}: field 'file_name' is missing; "
                                    "pass data rows with 'image_id' instead of an image directory.")
            by_id[img["id"]] = {"image": str(d / img["file_name"])}
        return by_id
    rows = load_rows(d)
    by_name = {Path(img["file_name"]).name: img["id"] for img in gt["images"] if isinstance(img.get("file_name"), str)}
    for i, row in enumerate(rows):
        image = row.get("image")
        if not isinstance(image, str):
            raise EvalDataError(f"data file {d}, row {i}: field 'image' must be a path string (image bytes in rows "
                                "are not supported by eval; write the images to files).")
        image_id = row.get("image_id")
        if image_id is None:
            image_id = by_name.get(Path(image).name)
        if image_id is None:
            continue  # a row for an image that is not in this ground truth
        if not isinstance(image_id, int):
            raise EvalDataError(f"data file {d}, row {i}: field 'image_id' must be an integer, got {image_id!r}.")
        path = Path(image)
        if not path.is_absolute():
            path = d.parent / path
        entry = {"image": str(path)}
        for key in ("input_width", "input_height"):
            if row.get(key) is not None:
                if not isinstance(row[key], int) or row[key] <= 0:
                    raise EvalDataError(f"data file {d}, row {i}: field '{key}' must be a positive integer.")
                entry[key] = row[key]
        by_id.setdefault(image_id, entry)
    return by_id


def build_queries(gt: dict[str, Any], data: str | os.PathLike, *, dataset: str, mode: str,
                  min_pixels: int = EVAL_MIN_PIXELS, max_pixels: int = EVAL_MAX_PIXELS,
                  limit: int | None = None) -> list[EvalQuery]:
    """The queries of one dataset (``gt`` is a validated COCO dict). Images without a data row are an error."""
    if mode not in ("coco", "grounding"):
        raise ValueError(f"mode {mode!r} is unknown; use 'coco' or 'grounding'")
    index = _image_index(gt, data)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    present: dict[int, list[int]] = {}
    for a in gt["annotations"]:
        ids = present.setdefault(a["image_id"], [])
        if a["category_id"] not in ids:
            ids.append(a["category_id"])
    images = gt["images"][:limit] if limit else gt["images"]
    queries = []
    for img in images:
        entry = index.get(img["id"])
        if entry is None:
            raise EvalDataError(f"{dataset}: ground-truth image id {img['id']} ({img.get('file_name', '?')}) has no "
                                f"row in {data}; add it or evaluate with a ground truth restricted to your rows.")
        w, h = img.get("width"), img.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise EvalDataError(f"{dataset}: ground-truth image id {img['id']}: fields 'width'/'height' must be "
                                "positive integers (the original image size).")
        if "input_width" in entry and "input_height" in entry:
            in_w, in_h = entry["input_width"], entry["input_height"]
        else:
            in_h, in_w = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
        common = dict(dataset=dataset, image_id=img["id"], image=entry["image"], width=w, height=h,
                      input_width=in_w, input_height=in_h)
        if mode == "coco":
            cats = tuple(names[c] for c in names)
            queries.append(EvalQuery(query_id=f"{dataset}/{img['id']}", problem=COCO_PROMPT.format(
                categories=", ".join(cats)), categories=cats, **common))
        else:
            for cid in sorted(present.get(img["id"], [])):
                queries.append(EvalQuery(query_id=f"{dataset}/{img['id']}/{cid}",
                                         problem=GROUNDING_PROMPT.format(category=names[cid]),
                                         categories=(names[cid],), **common))
    return queries
