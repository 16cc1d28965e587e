"""Parse Qwen2.5-VL grounding output: a (fenced) JSON list of {"bbox_2d": [x1, y1, x2, y2], "label": name}.

Extraction follows the released ``extract`` of Vision-R1/vision_r1/visionr1_qwen.py step by step, because
its quirks decide which boxes get rewarded:

* ``parse_json``: strip, drop a first line starting with "```json", cut at the next "```", json.loads;
* keep list items whose ``bbox_2d`` is a list of 4; coordinates go through ``int()`` (truncation; numeric
  strings are accepted by int(), as there); keep only x1 < x2 and y1 < y2;
* nothing kept (e.g. JSON truncated at the token limit): a regex that accepts only the exact spelling
  ``{"bbox_2d": [a, b, c, d], "label": "..."}`` with 1-3 digit coordinates or exactly 1000.

Two format checks: ``loose_format`` is the released ``dual_format_reward`` check; ``strict_format`` adds the
paper's template and content (bounds) checks. Nothing here evaluates model output: json.loads only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

# Exactly the released fallback pattern (spelling, spacing and digit counts matter).
FALLBACK_RE = re.compile(
    r'\{"bbox_2d": \[(\d{1,3}|1000), (\d{1,3}|1000), (\d{1,3}|1000), (\d{1,3}|1000)\], "label": "([^"]+)"\}')
_FORMAT_STRIP_RE = re.compile(r"```json\n|\n```")
_STRICT_KEYS = frozenset(("bbox_2d", "label"))
_FAILED = object()
_DECODER = json.JSONDecoder()
_SCAN_ONCE = _DECODER.scan_once
_JSON_WS = json.decoder.WHITESPACE


def json_loads(text: str) -> object:
    """``json.loads`` for str input, same results and failures, minus three Python call layers (it is the
    hottest call of the reward). Raises ValueError, StopIteration or RecursionError on bad input."""
    obj, end = _SCAN_ONCE(text, _JSON_WS.match(text, 0).end())
    if _JSON_WS.match(text, end).end() != len(text):
        raise ValueError("extra data after the JSON value")
    return obj


@dataclass(slots=True)
class ParsedAnswer:
    """Boxes extracted from one completion, in model-output coordinates (before rescaling)."""

    boxes: list[tuple[float, float, float, float]]
    labels: list[object]
    """Raw label values (usually str; anything else maps to the unknown class 0)."""
    status: str
    """"ok" (JSON), "fallback" (regex on truncated text), "empty" (valid JSON, no box) or "unparsable"."""
    format_ok: bool


def release_parse_json(stripped: str) -> tuple[str, object]:
    """The released ``parse_json`` on an already stripped completion: (the text given to json.loads, its
    value), the value being ``_FAILED`` where the release returns None."""
    lines = stripped.splitlines()
    if not lines:
        return "", _FAILED  # the release indexes lines[0] and catches the IndexError
    body = "\n".join(lines[1:]) if lines[0].startswith("```json") else stripped
    if "```" in body:
        body = body.split("```")[0]
    if _unclosed(body):
        return body, _FAILED  # what json.loads would conclude, without decoding most of the text first
    try:
        return body, json_loads(body)
    except (ValueError, StopIteration, RecursionError):
        return body, _FAILED


def _unclosed(text: str) -> bool:
    """True when json.loads(text) must fail because the array or object it opens is never closed: a JSON
    text starting with "[" (or "{") is valid only if its last non-whitespace character is "]" (or "}").
    Typical of an answer cut off at the token limit, where decoding would fail only at the very end."""
    head = text.lstrip(" \t\n\r")[:1]
    if head == "[":
        return not text.rstrip(" \t\n\r").endswith("]")
    if head == "{":
        return not text.rstrip(" \t\n\r").endswith("}")
    return False


def _items_to_boxes(obj: object, truncate: bool) -> tuple[list, list]:
    """Released ``extract`` list branch: returns (boxes, labels) of the items it keeps."""
    boxes: list = []
    labels: list = []
    if type(obj) is not list:
        return boxes, labels
    for item in obj:
        if type(item) is not dict:
            continue  # .get() raises on non-dicts in the release -> item skipped
        bbox = item.get("bbox_2d")
        if type(bbox) is not list or len(bbox) != 4:
            continue
        try:
            if truncate:
                x1, y1, x2, y2 = int(bbox[0]), int(bbox[1]), int(bbox[2]), int(bbox[3])
            else:
                x1, y1, x2, y2 = (_as_float(c) for c in bbox)
        except (TypeError, ValueError, OverflowError):
            continue
        if x1 < x2 and y1 < y2:
            boxes.append((x1, y1, x2, y2))
            labels.append(item.get("label"))
    return boxes, labels


def _as_float(c: object) -> float:
    # int() semantics minus the truncation: numeric strings are accepted, non-finite values rejected.
    v = float(c)
    if not math.isfinite(v):
        raise ValueError("non-finite coordinate")
    return v


def _fallback(stripped: str) -> tuple[list, list]:
    boxes, labels = [], []
    for x1, y1, x2, y2, label in FALLBACK_RE.findall(stripped):
        b = (int(x1), int(y1), int(x2), int(y2))
        if b[0] < b[2] and b[1] < b[3]:
            boxes.append(b)
            labels.append(label)
    return boxes, labels


def loose_format(raw: str, parsed_body: str, parsed: object) -> bool:
    """Released ``dual_format_reward`` check on the raw completion (before the num_instances inversion).

    1 unless the text is not JSON after removing "```json\\n" / "\\n```", or some dict item that has both
    ``bbox_2d`` and ``label`` has a ``bbox_2d`` that is not a list of 4. ``[]``, ``{}`` and items missing keys
    pass. ``parsed_body``/``parsed`` are the extraction's JSON text and result, reused when the text is equal.
    """
    text = _FORMAT_STRIP_RE.sub("", raw).strip()
    # json.loads succeeded on parsed_body, so its edges are JSON whitespace: equal text -> equal value.
    if parsed is not _FAILED and text == parsed_body.strip():
        data = parsed
    else:
        try:
            data = json_loads(text)
        except (ValueError, StopIteration, RecursionError):
            return False
    if type(data) is list:
        for item in data:
            if type(item) is dict and "bbox_2d" in item and "label" in item:
                bbox = item["bbox_2d"]
                if type(bbox) is not list or len(bbox) != 4:
                    return False
    return True


def strict_format(stripped: str, parsed: object, bound_x: float, bound_y: float) -> bool:
    """Paper's dual format: template (bare or one ```json fenced JSON list of {"bbox_2d", "label"} objects,
    nothing else) and content (4 finite numbers, 0 <= x1 < x2 <= bound_x, 0 <= y1 < y2 <= bound_y)."""
    if stripped.startswith("```"):
        if not (stripped.startswith("```json\n") and stripped.endswith("\n```") and stripped.count("```") == 2):
            return False
    elif "```" in stripped:
        return False
    if parsed is _FAILED or type(parsed) is not list:
        return False
    for item in parsed:
        if type(item) is not dict or item.keys() != _STRICT_KEYS:
            return False
        label, bbox = item["label"], item["bbox_2d"]
        if type(label) is not str or not label.strip() or type(bbox) is not list or len(bbox) != 4:
            return False
        for c in bbox:
            if type(c) not in (int, float) or not math.isfinite(c):
                return False
        x1, y1, x2, y2 = bbox
        if not (0 <= x1 < x2 <= bound_x and 0 <= y1 < y2 <= bound_y):
            return False
    return True


def parse_qwen(raw: str, *, truncate: bool, strict: bool, bound_x: float, bound_y: float) -> ParsedAnswer:
    """Extract boxes and check the format of one completion (see the module docstring)."""
    stripped = raw.strip()
    body, parsed = release_parse_json(stripped)
    boxes, labels = _items_to_boxes(parsed, truncate)
    if boxes:
        status = "ok"
    else:
        boxes, labels = _fallback(stripped)
        status = "fallback" if boxes else ("unparsable" if parsed is _FAILED else "empty")
    if strict:
        ok = strict_format(stripped, parsed, bound_x, bound_y)
    else:
        ok = loose_format(raw, body, parsed)
    return ParsedAnswer(boxes=boxes, labels=labels, status=status, format_ok=ok)
