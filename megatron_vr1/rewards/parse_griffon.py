"""Parse Griffon-G text output: ``label-[x1,y1,x2,y2] & label-[...]`` with 0-1 coordinates and 3 decimals.

The pattern of the coordinates is the one of Griffon's eval parser (``\\[\\d+\\.\\d{3}, ...\\]``). The Griffon-G
training reward was never released, so the format check is the paper's: template (the whole answer is
"&"-separated ``label-[...]`` segments) and content (each coordinate in [0, 1] with exactly 3 decimals,
x1 < x2, y1 < y2).
"""

from __future__ import annotations

import re

from megatron_vr1.rewards.parse_qwen import ParsedAnswer

_NUM = r"(\d+\.\d{3})"
_BOX_RE = re.compile(rf"([^&\[\]]*?)-\[{_NUM},{_NUM},{_NUM},{_NUM}\]")
_SEGMENT_RE = re.compile(r"[^&\[\]\-][^&\[\]]*-\[\d+\.\d{3},\d+\.\d{3},\d+\.\d{3},\d+\.\d{3}\]")


def parse_griffon(raw: str) -> ParsedAnswer:
    """Boxes (normalised 0-1) and labels of one Griffon-G answer; "none"/empty text is an empty answer."""
    text = raw.strip()
    boxes: list = []
    labels: list = []
    for label, *coords in _BOX_RE.findall(text):
        x1, y1, x2, y2 = (float(c) for c in coords)
        if x1 < x2 and y1 < y2:
            boxes.append((x1, y1, x2, y2))
            labels.append(label.strip())
    segments = [s.strip() for s in text.split("&")] if text else []
    template = bool(segments) and all(_SEGMENT_RE.fullmatch(s) for s in segments)
    content = template and len(boxes) == len(segments) and all(0.0 <= c <= 1.0 for b in boxes for c in b)
    if boxes:
        status = "ok"
    else:
        status = "empty" if not text else "unparsable"
    return ParsedAnswer(boxes=boxes, labels=labels, status=status, format_ok=content)
