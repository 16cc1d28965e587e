"""Batch extraction: every completion's boxes as one flat array (model coordinates), with owners and labels.

The semantics are those of ``parse_qwen`` (the released ``extract`` + format check); this module only makes
the common case fast, in three lanes:

* spelled: a fenced body written exactly as json.dumps writes the answer (``_SPELLED``: integer coordinates,
  plain labels), as policy samples almost always are. One regex fullmatch proves what json.loads would
  return, then one regex pass over the batch and one numpy parse read every coordinate and label: about a
  third of the cost of decoding the JSON and reading the items back (loose format check only).
* JSON: json.loads once per completion, then the items of the whole batch are read with one C-level
  ``map(dict.get, ...)`` per field and their ``bbox_2d`` lists converted at once (integers: one
  ``array('q')`` pass; otherwise one ``np.array`` call).
* exact: item by item (strings, wrong lengths, huge numbers...), as ``parse_qwen``.

Once the boxes are a numeric [N, 4] array, ``int()`` truncation, the x1 < x2, y1 < y2 filter and the loose
format check reduce to array operations with the same results.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from operator import itemgetter

import numpy as np

from megatron_vr1.config.reward import RewardRules
from megatron_vr1.rewards.parse_griffon import parse_griffon
from megatron_vr1.rewards.parse_qwen import (_FAILED, _FORMAT_STRIP_RE, _SCAN_ONCE, _fallback, _items_to_boxes,
                                             json_loads, loose_format, release_parse_json, strict_format)
from megatron_vr1.rewards.target import RewardTarget

_EXOTIC_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
"""Line boundaries of str.splitlines() other than "\\n"."""
_ASCII_BREAKS = ("\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e")
"""The ASCII ones (``in`` on a str is a fast memchr-like scan, a regex search is not)."""
_FAST_LIMIT = 1e15
"""Numbers beyond this take the exact path (float64 would no longer reproduce int() comparisons)."""

# The item spelling json.dumps (and the SFT data) produce: integers below _FAST_LIMIT without leading
# zeros, labels without escapes or control characters; any JSON whitespace around the items (Qwen2.5-VL
# often writes one item per line, "[\n\t{...},\n\t{...}\n]"). For a body this regex matches in full,
# json.loads returns exactly a list of {"bbox_2d": [4 ints], "label": <the text between the quotes>}.
_INT = r"-?(?:0|[1-9][0-9]{0,14}+)"
_ITEM = r'\{"bbox_2d": \[' + ", ".join([_INT] * 4) + r'\], "label": "[^"\\\x00-\x1f]*+"\}'
_WS = r"[ \t\n\r]*+"
_SPELLED = re.compile(_WS + r"\[" + _WS + r"(?:" + _ITEM + r"(?:" + _WS + "," + _WS + _ITEM + r")*" + _WS + r")?\]" + _WS)
_SPELLED_FIELDS = re.compile(r'"bbox_2d": \[([^\]]*)\], "label": "([^"]*)"')
_LABEL_KEY = '"label": "'
"""Once per item of a spelled body: a label cannot contain a quote."""
_SPELLED_ANSWER = object()
"""Stands for the JSON value of a spelled answer (valid JSON, a list): its items are read by _spelled_boxes."""


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


def _canonical_fences(texts: Sequence[str], stripped: list[str]) -> list[bool]:
    """True for each usual ``"```json\\n...\\n```"`` answer, where both released parsers reduce to slicing.

    Conditions: the raw text starts with the fence (a "\\n" before it would let the format regex eat
    "\\n```" first), exactly two "```", no line breaks other than "\\n" (the release re-joins splitlines()),
    and long enough that the two markers do not overlap. The string methods are mapped over the whole
    batch (C-level loops), and the line-break scan runs once on the joined answers in the usual case.
    """
    sizes = list(map(len, stripped))
    heads = map(str.startswith, texts, repeat("```json\n"))
    tails = map(str.endswith, stripped, repeat("\n```"))
    # No backtick between the two markers means exactly two "```"; a single-character find is a memchr
    # scan, several times cheaper than str.count("```"), which only the rare answer with a "`" inside pays.
    inner = map(str.find, stripped, repeat("`"), repeat(3), [n - 3 for n in sizes])
    flags = [h and t and n >= 12 and (k < 0 or s.count("```") == 2)
             for h, t, n, k, s in zip(heads, tails, sizes, inner, stripped)]
    joined = "".join(stripped)
    if not (joined.isascii() and not any(c in joined for c in _ASCII_BREAKS)):
        flags = [f and _EXOTIC_BREAKS.search(s) is None for f, s in zip(flags, stripped)]
    return flags


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
    usable = [type(t) is str and len(t) <= rules.max_completion_chars for t in completions]
    texts = completions if all(usable) else [t if u else "" for t, u in zip(completions, usable)]
    stripped_all = list(map(str.strip, texts))
    fenced = _canonical_fences(texts, stripped_all)
    format_list = [False] * b
    # "```json\n<body>\n```" with no other fence and plain "\n" line breaks: the release's parse_json body is
    # stripped[8:-3], and its format check sees the same JSON (see below).
    bodies = [s[8:-3] if f else "" for s, f in zip(stripped_all, fenced)]
    # Spelled answers (most of them), recognised for the whole batch at once.
    spelled = [i for i, m in enumerate(map(_SPELLED.fullmatch, bodies)) if m is not None]
    objs: list[object] = [_FAILED] * b
    pending_list = [False] * b  # loose format decided by the fast conversion below
    for i in spelled:
        objs[i] = _SPELLED_ANSWER
        pending_list[i] = True
    list_answers: list[int] = []  # completions whose JSON value is a list, and their items, flattened
    list_items: list = []
    list_sizes: list[int] = []
    for i, (u, obj) in enumerate(zip(usable, objs)):
        if not u or obj is _SPELLED_ANSWER:
            continue  # unusable: no boxes, format 0
        if fenced[i]:
            body = bodies[i]
            obj = _loads_fenced_body(body)
            pending_list[i] = obj is not _FAILED  # same JSON as the extraction's: checked on its items below
        else:
            body, obj = release_parse_json(stripped_all[i])
            if not strict:
                text = texts[i]
                fmt_text = _FORMAT_STRIP_RE.sub("", text).strip()
                if fmt_text == body.strip(" \t\n\r"):
                    # Equal up to JSON whitespace: json.loads gives the extraction's value, or fails the same
                    # way (typically an answer cut off at the token limit).
                    pending_list[i] = obj is not _FAILED
                else:
                    format_list[i] = loose_format(text, body, obj)
        objs[i], bodies[i] = obj, body
        if type(obj) is list:
            list_answers.append(i)
            list_items.extend(obj)
            list_sizes.append(len(obj))
    if strict:
        pending_list = [False] * b
        for i, t in enumerate(targets):
            if usable[i] and objs[i] is not _SPELLED_ANSWER:  # spelled: checked on their arrays below
                bx, by = (t.input_width, t.input_height) if absolute else (1000, 1000)
                format_list[i] = strict_format(stripped_all[i], objs[i], bx, by)
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
    if spelled:  # integers: no truncation needed; the scorer restores sample order (stable sort)
        sp_flat, sp_owner, sp_labels = _spelled_boxes(spelled, [bodies[i] for i in spelled])
        if strict:
            bounds = np.array([(t.input_width, t.input_height) if absolute else (1000, 1000) for t in targets],
                              dtype=np.float64)
            format_ok[spelled] = _strict_content(sp_flat, sp_owner, sp_labels, bounds)[spelled]
        flat, owner, labels = np.concatenate((sp_flat, flat)), np.concatenate((sp_owner, owner)), sp_labels + labels
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
    _append_fallback(np.nonzero(n_parsed == 0)[0].tolist(), stripped_all, objs, extra_boxes, extra_owner,
                     extra_labels, n_parsed, status)
    return Extracted(boxes=np.concatenate(extra_boxes), owner=np.concatenate(extra_owner), labels=extra_labels,
                     n_parsed=n_parsed, status=status, format_ok=format_ok)


def _append_fallback(answers: list[int], stripped: list[str], objs: list, boxes: list, owner: list,
                     all_labels: list, n_parsed: np.ndarray, status: list) -> None:
    """The released regex fallback (``parse_qwen._fallback``) for the answers that kept no box; the
    recovered boxes of all of them converted once. (Converting the matched digit strings with numpy
    instead of int() was measured 2.5x slower: numpy's str -> int cast is slow.)"""
    found: list = []
    found_owner: list[int] = []
    for i in answers:
        fb_boxes, labels = _fallback(stripped[i])
        if fb_boxes:
            found.extend(fb_boxes)
            found_owner.extend([i] * len(fb_boxes))
            all_labels.extend(labels)
            n_parsed[i] = len(fb_boxes)
            status[i] = "fallback"
        else:
            status[i] = "unparsable" if objs[i] is _FAILED else "empty"
    if found:
        boxes.append(np.array(found, dtype=np.float64))
        owner.append(np.array(found_owner, dtype=np.int64))


def _strict_content(boxes: np.ndarray, owner: np.ndarray, labels: list[str], bounds: np.ndarray) -> np.ndarray:
    """[B] ``strict_format`` of spelled answers from their arrays (answers without items pass). The
    template part holds for every spelled answer (a canonical fence, a list of {"bbox_2d", "label"} with
    4 integers each); left: non-blank labels and 0 <= x1 < x2 <= W, 0 <= y1 < y2 <= H (integers, exact)."""
    x1, y1, x2, y2 = boxes.T
    w, h = bounds[owner, 0], bounds[owner, 1]
    ok = (0 <= x1) & (x1 < x2) & (x2 <= w) & (0 <= y1) & (y1 < y2) & (y2 <= h)
    ok &= np.fromiter(map(len, map(str.strip, labels)), dtype=np.int64, count=len(labels)) > 0
    return np.bincount(owner[~ok], minlength=len(bounds)) == 0


def _spelled_boxes(answers: list[int], bodies: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Boxes (float64 [N, 4]), owners and labels of bodies that match _SPELLED, in answer order.

    One regex pass over the joined bodies yields each item's coordinate text and label (neither can
    contain the other's delimiters), and numpy parses all coordinates at once.
    """
    sizes = [body.count(_LABEL_KEY) for body in bodies]
    fields = _SPELLED_FIELDS.findall("\n".join(bodies))
    if not fields:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64), []
    coords = np.fromstring(", ".join(map(itemgetter(0), fields)), dtype=np.int64, sep=",")
    if len(fields) != sum(sizes) or coords.size != 4 * len(fields):
        raise AssertionError("spelled answers: item count mismatch (the _SPELLED regex admits a body it "
                             "should not)")
    owner = np.repeat(np.asarray(answers, dtype=np.int64), sizes)
    return coords.astype(np.float64).reshape(-1, 4), owner, list(map(itemgetter(1), fields))


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
