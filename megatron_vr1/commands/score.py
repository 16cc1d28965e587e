"""``megatron-vr1 score``: score completions with the Vision-R1 reward, one JSON object per line in and out.

Input line: ``completion`` (str), ``solution`` (JSON string: list of [label, [[x1, y1, x2, y2]]] in
original-image pixels), ``width``, ``height``, ``input_width``, ``input_height``, ``target_id_maps`` (JSON
string: label -> id >= 1), ``num_instances`` and optionally ``step`` (int or null; overrides --step).
Output line: ``format``, ``recall``, ``precision``, ``total`` and diagnostics, in input order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MAX_LINE_CHARS = 4 * 1024 * 1024
"""A longer input line is a bad row (bounds memory on hostile input)."""
CHUNK = 1024
"""Rows scored per score_batch call."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=["official", "paper"], default="official",
                        help="official = the released Vision-R1 code; paper = the paper's text (default official)")
    parser.add_argument("--step", type=int, default=None,
                        help="training step for the refinement schedule (default: none = released default)")
    parser.add_argument("--total-steps", type=int, default=None,
                        help="run length, needed with --step for the paper preset's fraction schedule")
    parser.add_argument("--in", dest="inp", required=True, type=Path, metavar="ROWS.jsonl",
                        help="input rows, one JSON object per line")
    parser.add_argument("--out", required=True, type=Path, metavar="SCORES.jsonl",
                        help="output scores, one JSON object per input row, same order")
    parser.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                        help="error: stop at the first malformed row (default); skip: drop it, count at the end")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a RewardConfig knob, e.g. --set iou_kind=iou (repeatable)")


class BadRow(Exception):
    """A malformed input row: the message names the line and the field."""


def _read_row(line: str, lineno: int, path: Path):
    from megatron_vr1.rewards import RewardInputError, target_from_row

    where = f"{path}:{lineno}"
    if len(line) > MAX_LINE_CHARS:
        raise BadRow(f"{where}: line longer than {MAX_LINE_CHARS} characters")
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadRow(f"{where}: not a JSON object ({e}); write one object per line") from None
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("completion"), str):
        raise BadRow(f"{where}: field 'completion' must be a string (the model's answer)")
    step = row.get("step", _MISSING)
    if step is not _MISSING and step is not None and (isinstance(step, bool) or not isinstance(step, int)
                                                      or step < 0):
        raise BadRow(f"{where}: field 'step' must be an integer >= 0 or null, got {step!r}")
    try:
        target = target_from_row(row)
    except RewardInputError as e:
        raise BadRow(f"{where}: {e}") from None
    return row["completion"], target, step


_MISSING = object()


def _config(args: argparse.Namespace):
    from megatron_vr1.config.base import apply_override
    from megatron_vr1.config.reward import RewardConfig

    cfg = RewardConfig(preset=args.preset)
    for assignment in args.overrides:
        cfg = apply_override(cfg, assignment)
    return cfg


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.config.base import ConfigError
    from megatron_vr1.rewards import RefinementSchedule, score_batch

    try:
        cfg = _config(args)
        schedule = RefinementSchedule.from_config(cfg, total_steps=args.total_steps)
    except (ConfigError, ValueError) as e:
        print(f"megatron-vr1 score: {e}", file=sys.stderr)
        return 2
    if not args.inp.is_file():
        print(f"megatron-vr1 score: input file {args.inp} does not exist", file=sys.stderr)
        return 2
    skipped, written = 0, 0
    try:
        with args.inp.open(encoding="utf-8") as fin, args.out.open("w", encoding="utf-8") as fout:
            batch: list = []
            for lineno, line in enumerate(_bounded_lines(fin), start=1):
                if not line.strip():
                    continue
                try:
                    batch.append(_read_row(line, lineno, args.inp))
                except BadRow as e:
                    if args.on_bad_row == "error":
                        fout.close()
                        args.out.unlink(missing_ok=True)  # no half-written output that looks complete
                        print(f"megatron-vr1 score: {e}", file=sys.stderr)
                        print("  fix the row, or pass --on-bad-row skip to drop malformed rows", file=sys.stderr)
                        return 1
                    skipped += 1
                    continue
                if len(batch) >= CHUNK:
                    written += _flush(batch, cfg, args.step, schedule, fout, score_batch)
            written += _flush(batch, cfg, args.step, schedule, fout, score_batch)
    except UnicodeDecodeError as e:
        print(f"megatron-vr1 score: {args.inp} is not UTF-8 text ({e})", file=sys.stderr)
        return 1
    except ValueError as e:  # a step with the paper preset's fraction schedule and no run length
        print(f"megatron-vr1 score: {e}", file=sys.stderr)
        print("  on the command line: pass --total-steps N (the run's optimizer steps), or --set schedule_unit=step",
              file=sys.stderr)
        args.out.unlink(missing_ok=True)
        return 2
    except OSError as e:
        print(f"megatron-vr1 score: {e}", file=sys.stderr)
        return 1
    msg = f"scored {written} rows -> {args.out}"
    if skipped:
        msg += f"; skipped {skipped} malformed rows"
    print(msg, file=sys.stderr)
    return 0


def _bounded_lines(fin):
    """Lines of ``fin``, never holding more than MAX_LINE_CHARS + 1 characters of one line in memory: the
    head of an overlong line is yielded (and rejected by _read_row), its remainder is skipped."""
    while True:
        line = fin.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
            while True:
                rest = fin.readline(MAX_LINE_CHARS)
                if not rest or rest.endswith("\n"):
                    break
        yield line


def _flush(batch: list, cfg, default_step, schedule, fout, score_batch) -> int:
    if not batch:
        return 0
    steps = [default_step if s is _MISSING else s for _, _, s in batch]
    scores = score_batch([c for c, _, _ in batch], [t for _, t, _ in batch], cfg, steps, schedule=schedule)
    for s in scores:
        fout.write(json.dumps({"format": s.format, "recall": s.recall, "precision": s.precision, "total": s.total,
                               "parse_status": s.parse_status, "n_pred": s.n_pred, "n_gt": s.n_gt,
                               "n_matched": s.n_matched, "n_tp": s.n_tp, "mean_iou": s.mean_iou,
                               "stage": s.stage}) + "\n")
    n = len(batch)
    batch.clear()
    return n
