"""Parse a Qwen2.5-VL answer the way the released Vision-R1 evaluation does (spec §4.1).

1. Markdown fence: if a line is exactly ```` ```json ````, keep what follows it, up to the next ```` ``` ````.
2. ``ast.literal_eval`` (never ``eval``); on failure cut after the last ``"}`` and append ``]`` (repairs an answer
   truncated at the token limit), then ``ast.literal_eval`` again.
3. Each list item is kept when it has a ``label`` string and a ``bbox_2d`` of four numbers; anything else in the
   item list is skipped and counted (the released code skips it inside a bare ``except``).

Returns typed records with the character span of each item's label and box in the answer text, so token
log-probabilities can be attached to them (``eval.scoring``).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

MAX_ANSWER_CHARS = 200_000
"""Answers longer than this are not parsed (a 512-token answer is ~2 kB); they count as unparsable."""

_FENCE = "```json"
_BOX_RE = re.compile(r"""["']bbox_2d["']\s*:\s*(\[[^\]]*\])""")
_LABEL_RE = re.compile(r"""["']label["']\s*:\s*(["'])(.*?)\1""", re.S)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedBox:
    """One predicted instance in input-image pixels, as the model wrote it (corners x1, y1, x2, y2)."""

    label: str
    box: tuple[float, float, float, float]
    label_span: tuple[int, int] | None = None
    """[start, end) character offsets of the label value in the full answer text, when located."""
    box_span: tuple[int, int] | None = None
    """[start, end) character offsets of the ``[x1, y1, x2, y2]`` list in the full answer text, when located."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedAnswer:
    boxes: tuple[ParsedBox, ...]
    status: str
    """"ok" (literal_eval of the fenced text), "repaired" (after the truncation repair) or "unparsable"."""
    n_skipped_items: int = 0
    """List items without a usable label / 4-number bbox_2d (dropped, as the released eval does)."""


def extract_fenced(text: str) -> tuple[str, int]:
    """The released ``parse_json``: the text after a line equal to ```` ```json ````, cut at the next ```` ``` ````.
    Returns (body, offset of body in ``text``); without a fence the whole text is the body."""
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == _FENCE:
            start = offset + len(line)
            end = text.find("```", start)
            return (text[start:] if end < 0 else text[start:end]), start
        offset += len(line)
    return text, 0


def _literal(body: str) -> object:
    try:
        return ast.literal_eval(body)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _UNPARSABLE


_UNPARSABLE = object()


def _is_coord(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_answer(text: str) -> ParsedAnswer:
    """Parse one generated answer (never raises; malformed answers give status "unparsable")."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return ParsedAnswer(boxes=(), status="unparsable")
    body, offset = extract_fenced(text)
    status = "ok"
    value = _literal(body)
    if value is _UNPARSABLE:
        end = body.rfind('"}')
        if end < 0:
            return ParsedAnswer(boxes=(), status="unparsable")
        body = body[: end + 2] + "]"
        value = _literal(body)
        status = "repaired"
    if value is _UNPARSABLE:
        return ParsedAnswer(boxes=(), status="unparsable")
    if not isinstance(value, (list, tuple)):  # e.g. a bare dict: the released loop finds no boxes in it
        return ParsedAnswer(boxes=(), status="unparsable")
    box_spans = [(m.start(1) + offset, m.end(1) + offset) for m in _BOX_RE.finditer(body)]
    label_spans = [(m.start(2) + offset, m.end(2) + offset) for m in _LABEL_RE.finditer(body)]
    spans_align = len(box_spans) == len(label_spans) == len(value)
    boxes, skipped = [], 0
    for i, item in enumerate(value):
        bbox = item.get("bbox_2d") if isinstance(item, dict) else None
        label = item.get("label") if isinstance(item, dict) else None
        if not (isinstance(label, str) and isinstance(bbox, (list, tuple)) and len(bbox) == 4
                and all(_is_coord(v) for v in bbox)):
            skipped += 1
            continue
        boxes.append(ParsedBox(label=label, box=tuple(float(v) for v in bbox),
                               label_span=label_spans[i] if spans_align else None,
                               box_span=box_spans[i] if spans_align else None))
    return ParsedAnswer(boxes=tuple(boxes), status=status, n_skipped_items=skipped)
