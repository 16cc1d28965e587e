"""``megatron-vr1 bench coco``: COCO bbox evaluation time, faster-coco-eval vs pycocotools, same inputs, same run.

Synthetic COCO-like data (default 5000 images x 10 GT boxes, 80 categories, all three area ranges) with noisy,
partly wrong-class and spurious detections, so matching, sorting and accumulation all do real work. Prints
seconds per phase (median over ``--repeats``), the speed-up, and the largest difference between the two
libraries' twelve statistics (should be 0).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--boxes", type=int, default=10, help="ground-truth boxes per image")
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per library (median reported)")
    parser.add_argument("--seed", type=int, default=0)


def synthetic_coco(n_images: int, boxes_per_image: int, n_categories: int, seed: int = 0
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A COCO ground truth and ~1.15 detections per GT box (85 % matched with jitter, 30 % spurious)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = n_images * boxes_per_image
    image_ids = np.repeat(np.arange(1, n_images + 1), boxes_per_image)
    side = rng.choice([16.0, 64.0, 200.0], size=n)
    w, h = side * rng.uniform(0.6, 1.4, n), side * rng.uniform(0.6, 1.4, n)
    x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
    cats = rng.integers(1, n_categories + 1, n)
    anns = [{"id": i + 1, "image_id": int(image_ids[i]), "category_id": int(cats[i]),
             "bbox": [float(x[i]), float(y[i]), float(w[i]), float(h[i])], "area": float(w[i] * h[i]), "iscrowd": 0}
            for i in range(n)]
    jitter = rng.normal(0, 0.1, (n, 4)) * side[:, None]
    keep = rng.random(n) < 0.85
    wrong = rng.random(n) < 0.2
    det_cats = np.where(wrong, rng.integers(1, n_categories + 1, n), cats)
    dets = [{"image_id": int(image_ids[i]), "category_id": int(det_cats[i]),
             "bbox": [float(x[i] + jitter[i, 0]), float(y[i] + jitter[i, 1]), max(1.0, float(w[i] + jitter[i, 2])),
                      max(1.0, float(h[i] + jitter[i, 3]))], "score": float(rng.random())}
            for i in np.flatnonzero(keep)]
    spurious = np.flatnonzero(rng.random(n) < 0.3)
    dets += [{"image_id": int(image_ids[i]), "category_id": int(rng.integers(1, n_categories + 1)),
              "bbox": [float(rng.uniform(0, 600)), float(rng.uniform(0, 440)), 30.0, 30.0], "score": float(rng.random())}
             for i in spurious]
    gt = {"images": [{"id": i, "width": 640, "height": 480} for i in range(1, n_images + 1)],
          "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_categories + 1)]}
    return gt, dets


def _time_library(name: str, gt: dict[str, Any], dets: list[dict[str, Any]]) -> tuple[dict[str, float], list[float]]:
    """Seconds per phase (load = index GT + loadRes) and the stats, for one library."""
    if name == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster as Evaluator
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Evaluator
    gt_copy, dets_copy = copy.deepcopy(gt), copy.deepcopy(dets)  # both libraries mutate their inputs
    times = {}
    with contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        coco_gt = COCO()
        coco_gt.dataset = gt_copy
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets_copy)
        times["load"] = time.perf_counter() - t
        ev = Evaluator(coco_gt, coco_dt, "bbox")
        for phase in ("evaluate", "accumulate", "summarize"):
            t = time.perf_counter()
            getattr(ev, phase)()
            times[phase] = time.perf_counter() - t
    times["total"] = sum(times.values())
    return times, [float(v) for v in ev.stats[:12]]


def run(args: argparse.Namespace) -> int:
    if min(args.images, args.boxes, args.categories, args.repeats) < 1:
        print("megatron-vr1 bench coco: --images, --boxes, --categories and --repeats must be positive")
        return 2
    t = time.perf_counter()
    gt, dets = synthetic_coco(args.images, args.boxes, args.categories, args.seed)
    print(f"data: {args.images} images, {len(gt['annotations'])} GT boxes, {len(dets)} detections, "
          f"{args.categories} categories (built in {time.perf_counter() - t:.1f} s)")
    libs = ("faster-coco-eval", "pycocotools")
    runs: dict[str, list[dict[str, float]]] = {lib: [] for lib in libs}
    stats: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for lib in libs:  # interleaved so machine noise hits both alike
            times, stats[lib] = _time_library(lib, gt, dets)
            runs[lib].append(times)
    phases = ("load", "evaluate", "accumulate", "summarize", "total")
    med = {lib: {p: statistics.median(r[p] for r in runs[lib]) for p in phases} for lib in libs}
    print(f"\n| library | {' | '.join(p + ' s' for p in phases)} | AP |")
    print("| --- |" + " --- |" * (len(phases) + 1))
    for lib in libs:
        print(f"| {lib} | " + " | ".join(f"{med[lib][p]:.2f}" for p in phases) + f" | {stats[lib][0]:.4f} |")
    speedup = med["pycocotools"]["total"] / med["faster-coco-eval"]["total"]
    diff = max(abs(a - b) for a, b in zip(stats["faster-coco-eval"], stats["pycocotools"]))
    print(f"\nspeed-up (pycocotools total / faster-coco-eval total, median of {args.repeats}): {speedup:.1f}x; "
          f"max |stat difference| = {diff:.2e}")
    return 0
