"""Generated answers -> COCO detections, with counts of everything that was dropped.

Boxes are rescaled from the model's input pixels to the original image (``x * width / input_width``), converted
to COCO [x, y, w, h], and their label (lower-cased) is mapped to the GT category id; unknown labels are dropped
and counted. Corners are not reordered (the released eval does not either). A box with x2 < x1 or y2 < y1 has a
negative COCO area, which puts it outside every area range, so COCOeval ignores it; it is dropped here (same
metrics) and counted as ``n_degenerate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_vr1.eval.parse import ParsedAnswer, parse_answer
from megatron_vr1.eval.queries import EvalQuery
from megatron_vr1.eval.scoring import box_scores


@dataclass(slots=True)
class AnswerCounts:
    """Tallies over the answers of one dataset (reported in metrics.json)."""

    n_queries: int = 0
    n_ok: int = 0
    n_repaired: int = 0
    """Parsed only after the truncated-JSON repair."""
    n_unparsable: int = 0
    n_truncated: int = 0
    """Answers that hit max_new_tokens (finish_reason "length")."""
    n_failed: int = 0
    """Queries whose generation raised (e.g. an unreadable image); they contribute no detections."""
    n_boxes: int = 0
    n_detections: int = 0
    n_unknown_label: int = 0
    n_skipped_items: int = 0
    n_degenerate: int = 0
    unknown_labels: dict[str, int] = field(default_factory=dict)

    def add(self, other: AnswerCounts) -> None:
        for k, v in asdict(other).items():
            if k == "unknown_labels":
                for lab, n in v.items():
                    self.unknown_labels[lab] = self.unknown_labels.get(lab, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)

    def to_json(self) -> dict[str, Any]:
        top = dict(sorted(self.unknown_labels.items(), key=lambda kv: -kv[1])[:50])
        return {**asdict(self), "unknown_labels": top}


def answer_to_detections(query: EvalQuery, text: str, name_to_id: dict[str, int], *, score_mode: str = "constant",
                         token_ids: Sequence[int] = (), logprobs: Sequence[float] = (),
                         decode: Callable[[list[int]], str] | None = None,
                         finish_reason: str = "stop") -> tuple[list[dict[str, Any]], AnswerCounts, ParsedAnswer]:
    """COCO detections of one answer. ``name_to_id`` maps lower-cased GT category names to ids. Never raises on
    a malformed answer: it is counted as unparsable and yields no detections."""
    counts = AnswerCounts(n_queries=1, n_truncated=int(finish_reason == "length"))
    parsed = parse_answer(text)
    if parsed.status == "unparsable":
        counts.n_unparsable = 1
        return [], counts, parsed
    counts.n_ok = int(parsed.status == "ok")
    counts.n_repaired = int(parsed.status == "repaired")
    counts.n_skipped_items = parsed.n_skipped_items
    counts.n_boxes = len(parsed.boxes)
    scores = box_scores(parsed.boxes, score_mode, token_ids=token_ids, logprobs=logprobs, decode=decode)
    sx = query.width / query.input_width
    sy = query.height / query.input_height
    dets = []
    for b, score in zip(parsed.boxes, scores):
        cid = name_to_id.get(b.label.lower())
        if cid is None:
            counts.n_unknown_label += 1
            counts.unknown_labels[b.label.lower()[:80]] = counts.unknown_labels.get(b.label.lower()[:80], 0) + 1
            continue
        x1, y1, x2, y2 = b.box
        if x2 < x1 or y2 < y1:
            counts.n_degenerate += 1
            continue
        dets.append({"image_id": query.image_id, "category_id": cid,
                     "bbox": [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy], "score": float(score)})
    counts.n_detections = len(dets)
    return dets, counts, parsed
