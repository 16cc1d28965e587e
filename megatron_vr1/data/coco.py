"""COCO-format ground truth <-> Vision-R1 rows, and writing rows files.

``rows_to_coco_gt`` turns rows into a COCO instances dict (one COCO image per row, boxes as xywh in
original-image pixels, category ids from target_id_maps), which pycocotools / faster-coco-eval load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_vr1.data.schema import RowError, VisionR1Row

MAX_ANNOTATION_BYTES = 2 * 1024 * 1024 * 1024


def load_coco(path: str | Path) -> dict[str, Any]:
    """Read a COCO instances json, checking the keys the converters need."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such COCO annotation file")
    if p.stat().st_size > MAX_ANNOTATION_BYTES:
        raise ValueError(f"{p}: larger than {MAX_ANNOTATION_BYTES} bytes; split the annotation file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); is it a COCO instances file?") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{p}: missing list {key!r}; expected a COCO instances json (images/annotations/"
                             f"categories)")
    return data


def xywh_to_xyxy(b: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def rows_to_coco_gt(rows: Sequence[VisionR1Row], *, file_names: Sequence[str] | None = None) -> dict[str, Any]:
    """COCO instances dict of ``rows``: image id = row position + 1, one annotation per solution box.

    Category ids come from the rows' target_id_maps; a label mapped to different ids in different rows is
    an error (the GT would be ambiguous).
    """
    categories: dict[str, int] = {}
    images, annotations = [], []
    for i, row in enumerate(rows):
        for label, cid in row.target_id_maps.items():
            if categories.setdefault(label, cid) != cid:
                raise ValueError(f"row {i}: label {label!r} has id {cid} but id {categories[label]} in an earlier "
                                 f"row; use one target_id_maps for the whole split")
        name = file_names[i] if file_names is not None else (row.image.name if isinstance(row.image, Path) else f"{i}")
        images.append({"id": i + 1, "file_name": str(name), "width": row.width, "height": row.height})
        for gt in row.solution:
            x1, y1, x2, y2 = gt.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": row.target_id_maps[gt.label.lower()],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    cats = [{"id": cid, "name": name} for name, cid in sorted(categories.items(), key=lambda kv: kv[1])]
    if len({c["id"] for c in cats}) != len(cats):
        raise ValueError("two labels share one category id across rows; use one target_id_maps per split")
    return {"images": images, "annotations": annotations, "categories": cats}


def image_reference(image_path: Path, rows_dir: Path) -> str:
    """How a rows file refers to an image: a path relative to the rows file's folder (POSIX separators)."""
    return Path(os.path.relpath(image_path.resolve(), rows_dir.resolve())).as_posix()


def write_jsonl(rows: Iterable[VisionR1Row], out_path: str | Path) -> int:
    """Write rows as JSONL with images referenced relative to ``out_path``; returns the number written."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w") as f:
        for row in rows:
            if isinstance(row.image, Path):
                value: str = image_reference(row.image, out.parent)
            else:
                import base64
                value = base64.b64encode(row.image).decode("ascii")
            f.write(json.dumps(row.to_record(value)) + "\n")
            n += 1
    return n


def write_parquet(rows: Iterable[VisionR1Row], out_path: str | Path) -> int:
    """Write rows as parquet (image bytes embedded, so the file is self-contained)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for row in rows:
        data = row.image.read_bytes() if isinstance(row.image, Path) else row.image
        records.append(row.to_record(data))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), out)
    return len(records)


def check_category_names(categories: list[dict[str, Any]], path: Path) -> dict[int, str]:
    """COCO category id -> lower-cased name, rejecting duplicates (labels must map to one id)."""
    names: dict[int, str] = {}
    for c in categories:
        if not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise RowError(path, 0, "categories", f"category {c!r:.80} needs an int id and a str name")
        names[c["id"]] = c["name"].lower()
    if len(set(names.values())) != len(names):
        raise RowError(path, 0, "categories", "two categories share a name; rename one")
    return names
