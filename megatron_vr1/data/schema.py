"""The Vision-R1 row (HF dataset JefferyZhan/Vision-R1-Data) as a typed record, its validation and Sample.

Columns: problem (str), image, solution (JSON str: ``[[label, [[x1, y1, x2, y2]]], ...]`` in original-image
pixels), width, height (original size), num_instances, target_id_maps (JSON str: label -> id >= 1), source.
Every validation failure is a ``RowError`` naming the file, the row and the field, and saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_vr1.data.image import decode_image_field, smart_resize
from megatron_vr1.types import GroundTruth, Sample

COLUMNS: tuple[str, ...] = ("problem", "image", "solution", "width", "height", "num_instances", "target_id_maps",
                            "source")
MAX_PROBLEM_CHARS = 20_000
MAX_INSTANCES = 10_000
"""Input caps: longer problems or more boxes than this are rejected as malformed rows."""


class RowError(ValueError):
    """A malformed dataset row: ``<file> row <n> field <name>: <problem>; <fix>``."""

    def __init__(self, file: str | Path, row: int, field: str, message: str):
        self.file, self.row, self.field, self.message = str(file), row, field, message
        super().__init__(f"{file} row {row} field {field!r}: {message}")


@dataclass(frozen=True, slots=True, kw_only=True)
class VisionR1Row:
    """One validated row. ``image`` is a resolved path or the encoded image bytes."""

    problem: str
    image: Path | bytes
    solution: tuple[GroundTruth, ...]
    width: int
    height: int
    num_instances: int
    target_id_maps: dict[str, int]
    source: str = ""

    def to_sample(self, sample_id: str, *, min_pixels: int, max_pixels: int) -> Sample:
        """The typed Sample with input_width/input_height from Qwen2.5-VL's smart_resize."""
        input_height, input_width = smart_resize(self.height, self.width, min_pixels=min_pixels,
                                                 max_pixels=max_pixels)
        return Sample(sample_id=sample_id, problem=self.problem,
                      image=str(self.image) if isinstance(self.image, Path) else self.image,
                      solution=self.solution, width=self.width, height=self.height, input_width=input_width,
                      input_height=input_height, num_instances=self.num_instances,
                      target_id_maps=dict(self.target_id_maps), source=self.source)

    def to_record(self, image_value: Any) -> dict[str, Any]:
        """The row as stored on disk (JSON strings for solution and target_id_maps)."""
        return {
            "problem": self.problem, "image": image_value,
            "solution": json.dumps([[g.label, [list(g.box)]] for g in self.solution]),
            "width": self.width, "height": self.height, "num_instances": self.num_instances,
            "target_id_maps": json.dumps(self.target_id_maps), "source": self.source,
        }


def _json_field(value: Any, err) -> Any:
    if isinstance(value, (list, dict)):
        return value
    if not isinstance(value, str):
        raise err(f"expected a JSON string, got {type(value).__name__}", "store it as a JSON string")
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise err(f"not valid JSON ({e.msg} at char {e.pos})", "write it with json.dumps") from None


def _int_field(raw: dict[str, Any], name: str, err, minimum: int) -> int:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise err(name)(f"expected an integer >= {minimum}, got {value!r}", f"set {name} to the correct count/size")
    return value


def parse_row(raw: Any, *, file: str | Path, row: int, base_dir: Path | None = None) -> VisionR1Row:
    """Validate one raw row (a dict of the Vision-R1 columns) and return the typed record.

    Checks: all columns present; problem a non-empty string; positive width/height; solution JSON of
    ``[label, [[x1, y1, x2, y2]]]`` items with x1 <= x2, y1 <= y2 inside the image; labels present in
    target_id_maps; num_instances == len(solution). The image itself is not decoded (see ``check``).
    """
    def err(field: str):
        return lambda message, fix: RowError(file, row, field, f"{message}; {fix}")

    if not isinstance(raw, dict):
        raise RowError(file, row, "<row>", f"expected an object with columns {list(COLUMNS)}, "
                                           f"got {type(raw).__name__}; write one JSON object per row")
    missing = [c for c in COLUMNS if c not in raw and c != "source"]
    if missing:
        raise RowError(file, row, missing[0], f"column missing (row has {sorted(raw)}); "
                                              f"add it (Vision-R1 columns: {list(COLUMNS)})")
    problem = raw["problem"]
    if not isinstance(problem, str) or not problem.strip() or len(problem) > MAX_PROBLEM_CHARS:
        raise err("problem")(f"expected a non-empty string of <= {MAX_PROBLEM_CHARS} chars",
                             "put the query text in problem")
    width = _int_field(raw, "width", err, 1)
    height = _int_field(raw, "height", err, 1)
    num_instances = _int_field(raw, "num_instances", err, 0)

    id_maps = _json_field(raw["target_id_maps"], err("target_id_maps"))
    if not isinstance(id_maps, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in id_maps.items()):
        raise err("target_id_maps")("expected a JSON object label -> integer id >= 1",
                                    'write e.g. {"person": 1, "dog": 2}')
    id_maps = {k.lower(): v for k, v in id_maps.items()}  # the reward lower-cases labels before lookup

    items = _json_field(raw["solution"], err("solution"))
    if not isinstance(items, list) or len(items) > MAX_INSTANCES:
        raise err("solution")(f"expected a JSON list of at most {MAX_INSTANCES} [label, [[x1, y1, x2, y2]]] items",
                              "write the ground-truth boxes as that list")
    solution = []
    for k, item in enumerate(items):
        solution.append(_parse_instance(item, k, width, height, id_maps, err("solution")))
    if num_instances != len(solution):
        raise err("num_instances")(f"is {num_instances} but solution has {len(solution)} boxes",
                                   "set num_instances = len(solution)")

    image_value = raw["image"]
    if isinstance(image_value, dict):  # HF Image feature: {"bytes": ..., "path": ...}
        image_value = image_value.get("bytes") or image_value.get("path")
    if not isinstance(image_value, (str, bytes, bytearray)) or not image_value:
        raise err("image")(f"expected a path, base64 text or bytes, got {type(image_value).__name__}",
                           "store the image path relative to the rows file, or its base64")
    try:
        image = decode_image_field(image_value, base_dir)
    except ValueError as e:
        raise err("image")(str(e), "store a valid path or base64 image") from None
    source = raw.get("source") or ""
    return VisionR1Row(problem=problem, image=image, solution=tuple(solution), width=width, height=height,
                       num_instances=num_instances, target_id_maps=id_maps, source=str(source))


def _parse_instance(item: Any, k: int, width: int, height: int, id_maps: dict[str, int], err) -> GroundTruth:
    ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)
          and len(item[1]) == 1 and isinstance(item[1][0], list) and len(item[1][0]) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item[1][0]))
    if not ok:
        raise err(f"item {k} is {item!r:.80}, expected [label, [[x1, y1, x2, y2]]]", "fix the item's shape")
    label, (box,) = item
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise err(f"item {k} box {box} has x2 < x1 or y2 < y1", "write boxes as corners [x1, y1, x2, y2]")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise err(f"item {k} box {box} lies outside the {width}x{height} image",
                  "clip the box to the image or fix width/height")
    if label.lower() not in id_maps:
        raise err(f"item {k} label {label!r} is absent from target_id_maps {sorted(id_maps)}",
                  "add the label to target_id_maps")
    return GroundTruth(label=label, box=(x1, y1, x2, y2))
