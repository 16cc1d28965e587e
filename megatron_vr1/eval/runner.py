"""Run an evaluation: queries -> greedy generation through a RolloutEngine -> detections -> COCO metrics.

The engine is anything implementing the RolloutEngine protocol (HF in-process or SGLang); this module only
builds ``GenerationRequest``s, so it imports neither torch nor sglang. A generation that fails (unreadable image,
engine error on one request) is counted and the evaluation goes on; a malformed answer is counted as unparsable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_vr1.eval.coco_metrics import CocoMetrics, coco_metrics
from megatron_vr1.eval.detections import AnswerCounts, answer_to_detections
from megatron_vr1.eval.queries import EVAL_MAX_PIXELS, EVAL_MIN_PIXELS, EvalQuery, build_queries
from megatron_vr1.eval.scoring import SCORE_MODES
from megatron_vr1.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalSettings:
    """How to query the model (defaults: the released Vision-R1 evaluation for Qwen2.5-VL)."""

    mode: str = "coco"
    """"coco": one query per image with all categories; "grounding": one per (image, present category)."""
    score: str = "constant"
    """"constant" (0.99 per box, the paper's Qwen protocol) or "logprob" (Griffon's accum_probs)."""
    max_new_tokens: int = 512
    batch_size: int = 8
    """Queries per engine.generate call."""
    limit: int | None = None
    """Evaluate only the first N images of each dataset (smoke runs); None = all."""
    min_pixels: int = EVAL_MIN_PIXELS
    max_pixels: int = EVAL_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in ("coco", "grounding"):
            raise ValueError(f"mode={self.mode!r} is invalid: use 'coco' (COCO val2017) or 'grounding' (ODinW)")
        if self.score not in SCORE_MODES:
            raise ValueError(f"score={self.score!r} is invalid: use one of {SCORE_MODES}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}, batch_size={self.batch_size} are invalid: "
                             "both must be positive")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} is invalid: use a positive number of images or None for all")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels} are invalid: need "
                             "0 < min_pixels <= max_pixels")


@dataclass(slots=True, kw_only=True)
class DatasetResult:
    name: str
    metrics: CocoMetrics
    counts: AnswerCounts
    detections: list[dict[str, Any]]
    answers: list[dict[str, Any]] = field(default_factory=list)
    """Per query: query_id, image_id, image, text, status, finish_reason, boxes (input px), n_detections."""
    queries: list[EvalQuery] = field(default_factory=list)


def _generate_safely(engine: RolloutEngine, requests: list[GenerationRequest]) -> list[Any]:
    """engine.generate on the batch; if it raises, retry one request at a time so one bad input (e.g. an
    unreadable image) fails only its own query. Returns a Completion or an error string per request."""
    try:
        return [group[0] for group in engine.generate(requests)]
    except Exception as batch_error:  # any engine failure: isolate it below rather than abort the evaluation
        log.warning("batch of %d failed (%s); retrying one by one", len(requests), batch_error)
    out: list[Any] = []
    for req in requests:
        try:
            out.append(engine.generate([req])[0][0])
        except Exception as e:  # noqa: BLE001 - recorded per query and counted as n_failed
            out.append(f"{type(e).__name__}: {e}")
    return out


def evaluate_dataset(engine: RolloutEngine, gt: dict[str, Any], data: str, *, name: str, settings: EvalSettings,
                     render: Callable[[str], str], decode: Callable[[Sequence[int]], str] | None = None,
                     input_size: Callable[[str], tuple[int, int]] | None = None,
                     progress: Callable[[str], None] | None = None) -> DatasetResult:
    """Evaluate one COCO-format dataset (``gt`` validated) with images found through ``data``.

    ``render(problem)`` gives the chat-formatted prompt; ``decode`` maps token ids to text (needed for logprob
    scores); ``input_size(image)`` gives the engine's (width, height) for an image, overriding smart_resize.
    """
    queries = build_queries(gt, data, dataset=name, mode=settings.mode, min_pixels=settings.min_pixels,
                            max_pixels=settings.max_pixels, limit=settings.limit)
    name_to_id = {c["name"].lower(): c["id"] for c in gt["categories"]}
    sampling = SamplingParams(temperature=0.0, max_new_tokens=settings.max_new_tokens, n=1)
    want_logprobs = settings.score == "logprob"
    counts = AnswerCounts()
    detections: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    sizes: dict[str, tuple[int, int]] = {}
    for start in range(0, len(queries), settings.batch_size):
        batch = queries[start:start + settings.batch_size]
        requests = [GenerationRequest(request_id=q.query_id, sample_id=q.query_id, prompt=render(q.problem),
                                      image=q.image, sampling=sampling, return_logprob=want_logprobs) for q in batch]
        for q, result in zip(batch, _generate_safely(engine, requests)):
            if isinstance(result, str):
                counts.add(AnswerCounts(n_queries=1, n_failed=1))
                answers.append({"query_id": q.query_id, "image_id": q.image_id, "image": q.image, "error": result})
                continue
            if input_size is not None and q.image not in sizes:
                sizes[q.image] = input_size(q.image)
            if input_size is not None:
                w, h = sizes[q.image]
                q = _with_input_size(q, w, h)
            dets, c, parsed = answer_to_detections(
                q, result.text, name_to_id, score_mode=settings.score, token_ids=result.token_ids,
                logprobs=result.logprobs, decode=decode, finish_reason=result.finish_reason)
            counts.add(c)
            detections += dets
            answers.append({"query_id": q.query_id, "image_id": q.image_id, "image": q.image, "text": result.text,
                            "status": parsed.status, "finish_reason": result.finish_reason,
                            "input_width": q.input_width, "input_height": q.input_height,
                            "boxes": [{"label": b.label, "bbox_2d": list(b.box)} for b in parsed.boxes],
                            "n_detections": len(dets)})
        if progress is not None:
            progress(f"{name}: {min(start + settings.batch_size, len(queries))}/{len(queries)} queries")
    # Only the evaluated images enter the metrics (a --limit run must not count the rest as misses).
    evaluated = {q.image_id for q in queries}
    sub_gt = {**gt, "images": [i for i in gt["images"] if i["id"] in evaluated],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in evaluated]}
    metrics = coco_metrics(sub_gt, detections)
    return DatasetResult(name=name, metrics=metrics, counts=counts, detections=detections, answers=answers,
                         queries=queries)


def _with_input_size(q: EvalQuery, width: int, height: int) -> EvalQuery:
    if (q.input_width, q.input_height) == (width, height):
        return q
    from dataclasses import replace

    return replace(q, input_width=width, input_height=height)
