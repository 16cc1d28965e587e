"""``megatron-vr1 coco-eval --gt GT.json --dt DT.json [--out metrics.json]``: COCO bbox metrics.

Prints the twelve pycocotools statistics and a per-category AP table; writes them as JSON with ``--out``.
Malformed inputs give one line naming the file, row and field (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help="COCO-format ground truth (images, annotations, categories)")
    parser.add_argument("--dt", required=True, help="COCO results list: [{image_id, category_id, bbox, score}]")
    parser.add_argument("--out", default=None, help="write metrics.json here (stats + per-category AP)")
    parser.add_argument("--quiet", action="store_true", help="do not print the per-category table")


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.eval.coco_metrics import STAT_KEYS, CocoInputError, evaluate_files
    from megatron_vr1.eval.report import per_category_table

    try:
        metrics = evaluate_files(args.gt, args.dt)
    except CocoInputError as e:
        print(f"megatron-vr1 coco-eval: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={metrics.stats[k]:.4f}" for k in STAT_KEYS))
    if not args.quiet:
        print(per_category_table(metrics.per_category))
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(metrics.to_json(), indent=2))
        except OSError as e:
            print(f"megatron-vr1 coco-eval: cannot write --out {out}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
    return 0
