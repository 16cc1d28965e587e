"""The Vision-R1 criterion-driven reward for a batch of completions (spec vision-r1.md §1, §2, §8).

``score_batch`` parses each completion once (extract.py), then does the geometry for the whole batch on
padded [P, G, B] pair arrays, the matching per completion (scipy) and the criteria on [B, G] arrays. Per
completion:

* format: dual format check (loose = released, strict = paper), inverted on negative samples by the
  released code;
* recall: true positives (matched overlap vs ξ0) / num_instances, then f(x) with the stage's (ξ1, ξ2);
* precision: per matched instance f(overlap) with the stage's band, averaged over matched pairs
  (released) or over all predictions;
* total: their sum (or mean).

Negative sample (num_instances == 0) with predicted boxes: the released code crashes there (torch.cat of
an empty ground-truth list, then a division by num_instances = 0). We define recall = precision = 0: every
box on an image without objects is a false positive. With no boxes, recall = precision = 1 (as released).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import fields
from itertools import repeat

import numpy as np

from megatron_vr1.config.reward import RewardConfig, RewardRules
from megatron_vr1.rewards.boxes import iou_giou, l1
from megatron_vr1.rewards.matching import match_padded
from megatron_vr1.rewards.extract import extract_batch
from megatron_vr1.rewards.schedule import RefinementSchedule
from megatron_vr1.rewards.target import RewardTarget
from megatron_vr1.types import RewardBreakdown

MAX_ABS_COORD = 1e9
"""Predicted coordinates beyond this (model space) are dropped: they only produce inf/NaN geometry."""


_CONFIG_FIELDS = tuple(f.name for f in fields(RewardConfig))
_RULES_CACHE: dict[tuple, RewardRules] = {}


def _rules(cfg: RewardConfig) -> RewardRules:
    """``cfg.rules()``, cached on the config's values (resolving the preset is ~2% of a batch). A config
    with an unhashable value (a list band) is resolved every time."""
    key = tuple(map(getattr, repeat(cfg), _CONFIG_FIELDS))
    try:
        hit = _RULES_CACHE.get(key)
    except TypeError:
        return cfg.rules()
    if hit is None:
        if len(_RULES_CACHE) >= 64:
            _RULES_CACHE.clear()
        hit = _RULES_CACHE[key] = cfg.rules()
    return hit


def _class_ids(labels: list, owner: np.ndarray, targets: Sequence[RewardTarget]) -> np.ndarray:
    """Class id of each predicted label (released: stripped, lower-cased; unknown or non-string -> 0).

    A batch has few distinct labels and few distinct id maps (make_target shares equal maps): look each
    (map, label) pair up once, then index a [maps, labels] table instead of a dict lookup per box.
    """
    if not labels:
        return np.zeros(0, dtype=np.int64)
    try:
        codes = dict.fromkeys(labels)
    except TypeError:  # a JSON list or object as label: unhashable, and class 0 anyway
        labels = [lb if type(lb) is str else None for lb in labels]
        codes = dict.fromkeys(labels)
    uniq = list(codes)
    for j, lb in enumerate(uniq):
        codes[lb] = j
    code = np.fromiter(map(codes.__getitem__, labels), dtype=np.int64, count=len(labels))
    # Distinct maps by identity (their targets keep them alive for the call, so ids are unique).
    maps = {id(t.target_id_maps): t.target_id_maps for t in targets}
    row = {k: j for j, k in enumerate(maps)}
    map_of = np.fromiter(map(row.__getitem__, [id(t.target_id_maps) for t in targets]), dtype=np.int64,
                         count=len(targets))
    keys = [lb.strip().lower() if type(lb) is str else None for lb in uniq]
    table = np.array([[m.get(k, 0) if k is not None else 0 for k in keys] for m in maps.values()],
                     dtype=np.int64)
    return table[map_of[owner], code]


def _band(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, inclusive: bool) -> np.ndarray:
    """f(x): 0 below ξ1, 1 above ξ2 (or at it when inclusive), x in between."""
    top = (x >= hi) if inclusive else (x > hi)
    return np.where(x < lo, 0.0, np.where(top, 1.0, x))


_PAD_ROW = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
"""Padding box (x1, y1, x2, y2, class, area): a unit box, so no pair has a zero union or enclosing box and
the geometry needs no masked division. Padding pairs are never read."""


def _pad_boxes(rows: np.ndarray, bidx: np.ndarray, pos: np.ndarray, b: int, n: int) -> np.ndarray:
    """Sample-ordered [N, 5] rows (x1, y1, x2, y2, class) as a padded, coordinate-first [6, max(n, 1), B]
    array, the box area appended (computed once per box, not once per pair)."""
    out = np.empty((6, max(n, 1), b))
    out[...] = _PAD_ROW[:, None, None]
    out[:5, pos, bidx] = rows.T
    out[5, pos, bidx] = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
    return out


def _positions(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample index and position within the sample of each row of a flat, sample-ordered array."""
    bidx = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return bidx, np.arange(int(counts.sum())) - starts[bidx]


def _canonical_rows(rows: np.ndarray, bidx: np.ndarray) -> np.ndarray:
    """``rows`` sorted by (sample, x1, y1, x2, y2, class), a function of each sample's set of rows.

    Sorting by (sample, x1, y1) first is half the passes of the full lexsort and already total when no
    two rows of a sample share x1 and y1 (almost always); otherwise the full lexsort decides.
    """
    order = np.lexsort((rows[:, 1], rows[:, 0], bidx))
    s = rows[order]
    sb = bidx[order]
    if ((sb[1:] == sb[:-1]) & (s[1:, 0] == s[:-1, 0]) & (s[1:, 1] == s[:-1, 1])).any():
        s = rows[np.lexsort((rows[:, 4], rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0], bidx))]
    return s


def _stage_arrays(steps: Sequence[int | None], schedule: RefinementSchedule) -> tuple[list[str], np.ndarray]:
    """Stage names and the thresholds (ξ0, recall ξ1, ξ2, precision ξ1, ξ2): [1, 5] when every completion
    shares one stage (broadcasts), else [B, 5]."""
    cache: dict[int | None, tuple[str, tuple[float, ...]]] = {}
    for s in set(steps):
        st = schedule.stage_at(s)
        th = st.thresholds
        cache[s] = (st.name, (th.tp_threshold, *th.recall_band, *th.precision_band))
    names = [cache[s][0] for s in steps]
    if len(cache) == 1:
        return names, np.asarray([next(iter(cache.values()))[1]], dtype=np.float64)
    return names, np.asarray([cache[s][1] for s in steps], dtype=np.float64)


def score_batch(completions: Sequence[str], targets: Sequence[RewardTarget], cfg: RewardConfig | RewardRules,
                step: int | None | Sequence[int | None] = None, *,
                schedule: RefinementSchedule | None = None) -> list[RewardBreakdown]:
    """Score each completion against its target; returns one float64 RewardBreakdown per completion.

    ``step`` is the optimizer step (one for the batch, or one per completion); ``None`` = no step (released:
    no differentiation). A fraction-based schedule needs ``schedule`` built with the run length. Never
    raises on completion text: unparsable output scores format 0 and no boxes.
    """
    if len(completions) != len(targets):
        raise ValueError(f"score_batch: {len(completions)} completions but {len(targets)} targets")
    rules = _rules(cfg) if isinstance(cfg, RewardConfig) else cfg
    schedule = schedule or RefinementSchedule(rules)
    b = len(completions)
    if b == 0:
        return []
    steps = list(step) if isinstance(step, Sequence) else [step] * b
    if len(steps) != b:
        raise ValueError(f"score_batch: {len(steps)} steps for {b} completions")
    stage_names, th = _stage_arrays(steps, schedule)
    ex = extract_batch(completions, targets, rules)

    # ---- flat predictions, grouped by completion in answer order; cap each completion's count ----------
    # One [N, 5] array (x1, y1, x2, y2, class id; ids are small ints, exact in float64): every filter,
    # sort and pad below is one operation instead of one per field.
    owner = ex.owner
    rows = np.empty((len(owner), 5))
    rows[:, :4] = ex.boxes
    use_labels = rules.matching_cost == "released" or rules.label_rule == "match"
    rows[:, 4] = _class_ids(ex.labels, owner, targets) if use_labels else 0.0
    if len(owner) > 1 and not (np.diff(owner) >= 0).all():
        order = np.argsort(owner, kind="stable")
        rows, owner = rows[order], owner[order]
    n_parsed = ex.n_parsed
    if n_parsed.max() > rules.max_predictions:
        _, pos = _positions(n_parsed)
        keep = pos < rules.max_predictions
        rows, owner = rows[keep], owner[keep]
    if len(rows) and not np.abs(rows[:, :4]).max() <= MAX_ABS_COORD:  # one reduction in the usual case
        finite = (np.abs(rows[:, :4]) <= MAX_ABS_COORD).all(axis=1)
        rows, owner = rows[finite], owner[finite]
    kept = np.bincount(owner, minlength=b)

    # ---- rescale model coordinates to original-image pixels: x / input_width * width (release order) ----
    meta = np.frombuffer(b"".join([t.meta for t in targets]), dtype=np.float64).reshape(b, 6)
    n_inst = meta[:, 5]
    n_gt = meta[:, 4].astype(np.int64)
    if rules.output_format == "griffon_text":
        div = np.ones((b, 4))
    elif rules.coordinates == "absolute":
        div = meta[:, [2, 3, 2, 3]]
    else:
        div = np.full((b, 4), 1000.0)
    # Rows are grouped by sample here: np.repeat by counts is the per-row sample lookup, without fancy indexing.
    rows[:, :4] = rows[:, :4] / np.repeat(div, kept, axis=0) * np.repeat(meta[:, [0, 1, 0, 1]], kept, axis=0)

    # Canonical order inside each sample: the result must not depend on the order of the predictions.
    bidx, pos = _positions(kept)
    pred = _pad_boxes(_canonical_rows(rows, bidx), bidx, pos, b, int(kept.max()))
    gbidx, gpos = _positions(n_gt)
    g_max = int(n_gt.max())
    gt = _pad_boxes(np.concatenate([t.gt_rows if t.gt_rows is not None else
                                    np.column_stack((t.gt_boxes, t.gt_class_ids.astype(np.float64)))
                                    for t in targets]), gbidx, gpos, b, g_max)

    # ---- geometry on [P, G, B] pair arrays, box-prioritized matching ---------------------------------
    # Batch innermost: numpy broadcasts over rows of B contiguous values, 2x faster than over rows of G
    # (the [B, P, G] layout), without the memory of expanding every pair (see boxes.py).
    p_box = tuple(pred[k][:, None, :] for k in (0, 1, 2, 3, 5))
    g_box = tuple(gt[k][None, :, :] for k in (0, 1, 2, 3, 5))
    iou, giou = iou_giou(p_box, g_box)
    overlap = giou if rules.iou_kind == "giou" else iou
    cost = l1(p_box, g_box)  # DETR box cost, L1 on unnormalised pixels: box-dominated
    cost -= giou
    if rules.matching_cost == "released":
        cost -= pred[4][:, None, :] == gt[4][None, :, :]
    m_sample, m_pred, m_gt = match_padded(cost, kept, n_gt)
    matched = np.zeros((b, max(g_max, 1)), dtype=bool)
    matched[m_sample, m_gt] = True
    val = np.zeros((b, max(g_max, 1)))
    val[m_sample, m_gt] = overlap[m_pred, m_gt, m_sample]
    n_matched = matched.sum(axis=1)
    mean_ov = (val * matched).sum(axis=1) / np.maximum(n_matched, 1)  # geometry only, whatever the labels
    if rules.label_rule == "match":  # a wrong label is a miss, as in COCO AP (unknown labels are class 0)
        val[m_sample, m_gt] *= pred[4][m_pred, m_sample] == gt[4][m_gt, m_sample]

    # ---- criteria ------------------------------------------------------------------------------------
    tp_thr, r_lo, r_hi, p_lo, p_hi = (th[:, i:i + 1] for i in range(5))
    if rules.tp_rule == "clamp":  # released modify_tensor(ξ0, ξ0): equal to ξ0 counts ξ0, not 1
        tp_val = np.where(val < tp_thr, 0.0, np.where(val > tp_thr, 1.0, val))
    else:
        tp_val = (val >= tp_thr).astype(np.float64)
    tp_sum = (tp_val * matched).sum(axis=1)
    inclusive = rules.band_upper == "inclusive"
    recall = _band(tp_sum / np.maximum(n_inst, 1.0), r_lo[:, 0], r_hi[:, 0], inclusive)

    inst = np.where(val < tp_thr, 0.0, val) if rules.precision_gate else val
    inst = _band(inst, p_lo, p_hi, inclusive) * matched
    if rules.precision_denominator == "matched":
        denom = n_matched.astype(np.float64)
    else:
        denom = np.maximum(n_parsed, kept).astype(np.float64)
    precision = inst.sum(axis=1) / np.maximum(denom, 1.0)

    has_boxes = kept > 0
    negative = n_inst == 0
    recall = np.where(has_boxes, np.where(negative, 0.0, recall), np.where(negative, 1.0, 0.0))
    precision = np.where(has_boxes, np.where(negative, 0.0, precision), np.where(negative, 1.0, 0.0))
    fmt = ex.format_ok.astype(np.float64)
    if rules.negative_samples == "invert_format":
        fmt = np.where(negative, 1.0 - fmt, fmt)
    total = fmt + recall + precision
    if rules.total == "mean":
        total = total / 3.0
    n_tp = ((val >= tp_thr) & matched).sum(axis=1)

    return _records(b, format=fmt.tolist(), recall=recall.tolist(), precision=precision.tolist(),
                    total=total.tolist(), parse_status=ex.status, n_pred=n_parsed.tolist(), n_gt=n_gt.tolist(),
                    n_matched=n_matched.tolist(), mean_iou=mean_ov.tolist(), n_tp=n_tp.tolist(), stage=stage_names)


_RECORD_SETTERS = {f.name: getattr(RewardBreakdown, f.name).__set__ for f in fields(RewardBreakdown)}


def _records(b: int, **columns: list) -> list[RewardBreakdown]:
    """``b`` RewardBreakdowns from one list per field, filled column by column through the slot
    descriptors: the frozen dataclass __init__ (one object.__setattr__ per field) was ~7% of a batch."""
    if columns.keys() != _RECORD_SETTERS.keys():
        raise TypeError(f"_records: fields {sorted(columns)} != {sorted(_RECORD_SETTERS)}")
    out = list(map(object.__new__, repeat(RewardBreakdown, b)))
    for name, values in columns.items():
        deque(map(_RECORD_SETTERS[name], out, values), maxlen=0)
    return out
