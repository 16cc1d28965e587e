"""Batch extraction: every completion's boxes as one flat array (model coordinates), with owners and labels.

The semantics are those of ``parse_qwen`` (the released ``extract`` + format check); this module only makes
the common case fast. After json.loads (once per completion, unavoidable), the items of the whole batch
are read with one C-level ``map(dict.get, ...)`` per field and their ``bbox_2d`` lists converted at once
(integers: one ``array('q')`` pass; otherwise one ``np.array`` call). When that yields a numeric [N, 4]
array, ``int()`` truncation, the x1 < x2, y1 < y2 filter and the loose format check reduce to array
operations with the same results; otherwise (strings, wrong lengths, huge numbers...) the completion takes
the exact item-by-item path.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat

import numpy as np

from megatron_vr1.config.reward import RewardRules
from megatron_vr1.rewards.parse_griffon import parse_griffon
from megatron_vr1.rewards.parse_qwen import (_FAILED, _FORMAT_STRIP_RE, _SCAN_ONCE, _fallback, _items_to_boxes,
                                             json_loads, loose_format, release_parse_json, strict_format)
from megatron_vr1.rewards.target import RewardTarget

_EXOTIC_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
"""Line boundaries of str.splitlines() other than "\\n"."""
_FAST_LIMIT = 1e15
"""Numbers beyond this take the exact path (float64 would no longer reproduce int() comparisons)."""


@dataclass(slots=True)
class Extracted:
    boxes: np.ndarray
    """[N, 4] float64 in model-output coordinates; within one owner, in answer order."""
    owner: np.ndarray
    """[N] index of the completion each box belongs to."""
    labels: list
    """[N] raw label values."""
    n_parsed: np.ndarray
    """[B] boxes each completion produced."""
    status: list[str]
    format_ok: np.ndarray
    """[B] bool, the format check before any negative-sample inversion."""


def _canonical_fence(text: str, stripped: str) -> bool:
    """True for the usual ``"```json\\n...\\n```"`` answer, where both released parsers reduce to slicing.

    Conditions: the raw text starts with the fence (a "\\n" before it would let the format regex eat
    "\\n```" first), exactly two "```", no line breaks other than "\\n" (the release re-joins splitlines()),
    and long enough that the two markers do not overlap.
    """
    if not (text.startswith("```json\n") and len(stripped) >= 12 and stripped.endswith("\n```")
            and stripped.count("```") == 2):
        return False
    if stripped.isascii():  # str `in` scans are far cheaper than a regex search over the whole answer
        return not ("\r" in stripped or "\x0b" in stripped or "\x0c" in stripped or "\x1c" in stripped
                    or "\x1d" in stripped or "\x1e" in stripped)
    return _EXOTIC_BREAKS.search(stripped) is None


def _loads_fenced_body(body: str) -> object:
    """json_loads of a fenced body without the whitespace regexes in the usual case ("[...]\\n")."""
    if body[:1] in (" ", "\t", "\n", "\r", ""):
        try:
            return json_loads(body)
        except (ValueError, StopIteration, RecursionError):
            return _FAILED
    try:
        obj, end = _SCAN_ONCE(body, 0)
    except (ValueError, StopIteration, RecursionError):
        return _FAILED
    if end != len(body) and body[end:].strip(" \t\n\r"):
        return _FAILED  # extra data after the JSON value, as json.loads reports
    return obj


def _numeric(boxes: list) -> np.ndarray | None:
    """``boxes`` (JSON values) as a float64 [n, 4] array, or None if the exact path must handle them."""
    if not boxes:
        return np.zeros((0, 4))
    try:
        a = np.array(boxes)
    except (ValueError, TypeError, OverflowError):
        return None
    if a.ndim != 2 or a.shape[1] != 4 or a.dtype.kind not in "biuf":
        return None
    a = a.astype(np.float64)
    if not (np.abs(a) < _FAST_LIMIT).all():  # also rejects NaN and inf
        return None
    return a


def _int_boxes(boxes: list) -> np.ndarray | None:
    """The common case of ``_numeric``: every box a list of 4 JSON integers. One C-level pass, no nested
    np.array dtype discovery; None where anything else (floats, strings, wrong lengths) shows up."""
    if not boxes:
        return np.zeros((0, 4))
    try:
        if set(map(len, boxes)) != {4}:
            return None
        # array('q') takes ints (and bools, as int() does) and refuses floats, strings, lists and > int64.
        a = np.frombuffer(array("q", list(chain.from_iterable(boxes))), dtype=np.int64)  # from a list: faster
    except (TypeError, OverflowError, ValueError):
        return None
    if not (np.abs(a) < _FAST_LIMIT).all():
        return None
    return a.astype(np.float64).reshape(-1, 4)


def _item_fields(items: list) -> tuple[list, list] | None:
    """``bbox_2d`` and ``label`` of every item of the batch's JSON lists, via C-level map over dict.get;
    None if some item is not a dict (those answers then take the per-item comprehension)."""
    try:
        return list(map(dict.get, items, repeat("bbox_2d"))), list(map(dict.get, items, repeat("label")))
    except TypeError:
        return None


def _slow_items(obj: object, truncate: bool) -> tuple[np.ndarray, list]:
    boxes, labels = _items_to_boxes(obj, truncate)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels


def extract_batch(completions: Sequence[str], targets: Sequence[RewardTarget], rules: RewardRules) -> Extracted:
    """Boxes, labels, parse status and format of each completion (see the module docstring)."""
    if rules.output_format == "griffon_text":
        return _extract_griffon(completions, rules)
    b = len(completions)
    truncate = rules.coordinate_cast == "truncate"
    strict = rules.format_check == "strict"
    absolute = rules.coordinates == "absolute"
    format_list = [False] * b
    pending_list = [False] * b  # loose format decided by the fast conversion below
    stripped_all: list[str] = [""] * b
    objs: list[object] = [_FAILED] * b
    bodies: list[str] = [""] * b
    list_answers: list[int] = []  # completions whose JSON value is a list, and their items, flattened
    list_items: list = []
    list_sizes: list[int] = []
    for i, (text, t) in enumerate(zip(completions, targets, strict=True)):
        if type(text) is not str or len(text) > rules.max_completion_chars:
            continue  # unparsable: no boxes, format 0
        stripped = text.strip()
        canonical = _canonical_fence(text, stripped)
        if canonical:
            # "```json\n<body>\n```" with no other fence and plain "\n" line breaks: the release's
            # parse_json body is stripped[8:-3], and its format check sees the same JSON (see below).
            body = stripped[8:-3]
            obj = _loads_fenced_body(body)
        else:
            body, obj = release_parse_json(stripped)
        stripped_all[i], objs[i], bodies[i] = stripped, obj, body
        if type(obj) is list:
            list_answers.append(i)
            list_items.extend(obj)
            list_sizes.append(len(obj))
        if strict:
            bx, by = (t.input_width, t.input_height) if absolute else (1000, 1000)
            format_list[i] = strict_format(stripped, obj, bx, by)
        elif canonical:
            pending_list[i] = obj is not _FAILED  # same JSON as the extraction's: checked on its items below
        else:
            fmt_text = _FORMAT_STRIP_RE.sub("", text).strip()
            if fmt_text == body.strip(" \t\n\r"):
                # Equal up to JSON whitespace: json.loads gives the extraction's value, or fails the same way
                # (typically an answer cut off at the token limit).
                pending_list[i] = obj is not _FAILED
            else:
                format_list[i] = loose_format(text, body, obj)
    format_ok = np.array(format_list, dtype=bool)
    fmt_pending = np.array(pending_list, dtype=bool)

    # The fields of every item at once; boxes of the whole batch in one conversion. If some answer is
    # irregular, convert answer by answer and send the irregular ones down the exact item-by-item path.
    counts = np.zeros(b, dtype=np.int64)
    fields = _item_fields(list_items)
    integral = False  # integer coordinates need no int() truncation
    if fields is not None:
        all_boxes, all_labels = fields
        counts[list_answers] = list_sizes
        flat = _int_boxes(all_boxes)
        integral = flat is not None
        if flat is None:
            flat = _numeric(all_boxes)
    else:
        all_boxes, all_labels, flat = [], [], None
        for i in list_answers:
            pairs = [(it.get("bbox_2d"), it.get("label")) for it in objs[i] if type(it) is dict]
            all_boxes.extend(p[0] for p in pairs)
            all_labels.extend(p[1] for p in pairs)
            counts[i] = len(pairs)
    if flat is not None:
        good = np.ones(b, dtype=bool)
        labels = all_labels
    else:
        ends = np.cumsum(counts).tolist()
        starts = [e - n for e, n in zip(ends, counts.tolist())]
        per = [_numeric(all_boxes[s:e]) for s, e in zip(starts, ends)]
        good = np.fromiter((a is not None for a in per), dtype=bool, count=b)
        flat = np.concatenate([a for a in per if a is not None] or [np.zeros((0, 4))])
        labels = [lb for i in np.nonzero(good)[0].tolist() for lb in all_labels[starts[i]:ends[i]]]
    owner = np.repeat(np.arange(b)[good], counts[good])
    if truncate and not integral:
        flat = np.trunc(flat)
    keep = (flat[:, 0] < flat[:, 2]) & (flat[:, 1] < flat[:, 3])
    if not keep.all():
        flat, owner = flat[keep], owner[keep]
        labels = [lb for lb, k in zip(labels, keep.tolist()) if k]
    # Every dict item of a converted answer has a numeric list-of-4 bbox_2d: the loose check passes.
    format_ok |= fmt_pending & good

    n_parsed = np.bincount(owner, minlength=b)
    status = ["ok" if n else "unparsable" for n in n_parsed.tolist()]
    extra_boxes, extra_owner, extra_labels = [flat], [owner], labels
    for i in np.nonzero(~good)[0].tolist():
        arr, lbs = _slow_items(objs[i], truncate)
        if fmt_pending[i]:
            format_ok[i] = loose_format(completions[i], bodies[i], objs[i])
        _append(i, arr, lbs, extra_boxes, extra_owner, extra_labels, n_parsed, status)
    fb_all: list = []  # regex-recovered boxes of every answer that kept none, converted once
    fb_owner: list[int] = []
    for i in np.nonzero(n_parsed == 0)[0].tolist():
        fb_boxes, lbs = _fallback(stripped_all[i])
        if fb_boxes:
            fb_all.extend(fb_boxes)
            fb_owner.extend([i] * len(fb_boxes))
            extra_labels.extend(lbs)
            n_parsed[i] = len(fb_boxes)
            status[i] = "fallback"
        else:
            status[i] = "unparsable" if objs[i] is _FAILED else "empty"
    if fb_all:
        extra_boxes.append(np.array(fb_all, dtype=np.float64))
        extra_owner.append(np.array(fb_owner, dtype=np.int64))
    return Extracted(boxes=np.concatenate(extra_boxes), owner=np.concatenate(extra_owner), labels=extra_labels,
                     n_parsed=n_parsed, status=status, format_ok=format_ok)


def _append(i: int, arr: np.ndarray, labels: list, boxes: list, owner: list, all_labels: list,
            n_parsed: np.ndarray, status: list) -> None:
    if len(arr):
        boxes.append(arr.reshape(-1, 4))
        owner.append(np.full(len(arr), i, dtype=np.int64))
        all_labels.extend(labels)
        n_parsed[i] = len(arr)
        status[i] = "ok"


def _extract_griffon(completions: Sequence[str], rules: RewardRules) -> Extracted:
    b = len(completions)
    segs, labels, n_parsed, status = [], [], np.zeros(b, dtype=np.int64), []
    format_ok = np.zeros(b, dtype=bool)
    for i, text in enumerate(completions):
        if type(text) is not str or len(text) > rules.max_completion_chars:
            status.append("unparsable")
            continue
        p = parse_griffon(text)
        segs.append(np.asarray(p.boxes, dtype=np.float64).reshape(-1, 4))
        labels.extend(p.labels)
        n_parsed[i] = len(p.boxes)
        status.append(p.status)
        format_ok[i] = p.format_ok
    boxes = np.concatenate(segs) if segs else np.zeros((0, 4))
    return Extracted(boxes=boxes, owner=np.repeat(np.arange(b), n_parsed), labels=labels, n_parsed=n_parsed,
                     status=status, format_ok=format_ok)
